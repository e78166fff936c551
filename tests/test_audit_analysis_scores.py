"""Audit of the analysis surfaces: a damaged or hand-edited scores.json read by allocate.

Before the fix, allocate trusted every field of scores.json: a NaN error reached scipy's MILP (`ValueError:
c must be ... finite numbers`, a traceback, exit 1), a list where a map belongs raised AttributeError, and a
negative error or a zero/negative size was planned on silently (a plan with a negative predicted error).
"""

import pytest

from diffpro_cli.errors import InputError
from diffpro_cli.stages.allocate import AllocateConfig, allocate_plan
from test_allocate import fake_latency, make_scores


def _damaged(edit):
    scores = make_scores(n=6, measured=True)
    first = next(iter(scores["layers"]))
    edit(scores["layers"], first)
    return scores


def _cdf_priced(layers, name, cdf):
    """Scores that error_model 'auto' prices by cdf (no measured errors, a combined score <= 0), one cdf set."""
    for d in layers.values():
        d.pop("measured_error", None)
    layers[name].update(combined_score=-1.0, cdf=cdf)


def _plan(scores):
    return allocate_plan(scores, AllocateConfig(budget="avg-bits=6", protect=[]), latency_fn=fake_latency)


@pytest.mark.parametrize("edit, named", [
    # NaN error: crashed inside scipy.optimize.milp with a traceback
    (lambda layers, n: layers[n]["measured_error"].update({"8": float("nan")}), "measured_error"),
    # negative error: planned silently, the plan's predicted error negative
    (lambda layers, n: layers[n]["measured_error"].update({"4": -1.0}), "measured_error"),
    # an infinite activation error: planned silently around an unusable price
    (lambda layers, n: layers[n].update(measured_act_error={"8": float("inf")}), "measured_act_error"),
    # a list where the bit -> error map belongs: AttributeError traceback
    (lambda layers, n: layers[n].update(measured_error=[1e-3, 1e-5]), "measured_error"),
    # a layer that is not an object: AttributeError traceback
    (lambda layers, n: layers.update({n: 5}), "entry"),
    # zero-width / negative-size layers: planned silently with wrong sizes
    (lambda layers, n: layers[n].update(in_features=0), "in_features"),
    (lambda layers, n: layers[n].update(params=-5), "params"),
    (lambda layers, n: layers[n].update(out_features="wide"), "out_features"),
    # the cdf error model (no measured/taylor errors) prices with cdf: NaN crashed the MILP, -5 planned silently
    (lambda layers, n: _cdf_priced(layers, n, float("nan")), "cdf"),
    (lambda layers, n: _cdf_priced(layers, n, -5.0), "cdf"),
])
def test_damaged_scores_field_is_one_input_error_naming_layer_and_field(edit, named):
    scores = _damaged(edit)
    first = next(iter(scores["layers"]))
    with pytest.raises(InputError) as info:
        _plan(scores)
    message = str(info.value)
    assert first in message and named in message and "re-run `diffpro score`" in message


def test_missing_required_field_names_it():
    scores = _damaged(lambda layers, n: layers[n].pop("out_features"))
    with pytest.raises(InputError, match="has no out_features"):
        _plan(scores)


def test_intact_scores_still_plan():
    """The checks refuse nothing a real `diffpro score` writes (errors of 0 and null entries included)."""
    scores = _damaged(lambda layers, n: layers[n].update(measured_error={"4": 0.0, "8": 0.0}, macs=None))
    plan, _ = _plan(scores)
    assert plan["totals"]["error"] >= 0


@pytest.mark.parametrize("floor", [99, 17, 1, 0])
def test_protect_bits_outside_the_weight_widths_is_a_usage_error(floor):
    """--protect-bits 99 was accepted: no option meets it, so every plan warned 'the budget forces N
    protected layer(s) below 99 bits' whatever the budget (avg-bits=40 included)."""
    from diffpro_cli.errors import UsageError

    with pytest.raises(UsageError, match="--protect-bits"):
        allocate_plan(make_scores(n=6), AllocateConfig(budget="avg-bits=40", protect_bits=floor), latency_fn=fake_latency)
