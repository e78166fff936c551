"""The pair-bound assumption across score → allocate → quantize (stages/pair_bound_assumption.py): without
VNNI, score measures 8-bit layers as quantize's pair bound will store and run them, scores.json and
plan.json record it, and quantize says when it runs otherwise. With VNNI (default settings) nothing changes."""

import json

import pytest
import torch

from diffpro_cli.quant import kernels

TINY = ["--samples", "2", "--batch", "2", "--timesteps", "999:0:500"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_measured_bounded_errors_add_up_to_the_bounded_layer_really_running_w8a8(monkeypatch):
    """Without VNNI: both input grids are measured ("7" for unbounded 8-bit weights, "8" for bounded ones)
    and bounded weight error + "8" input error is the error of the layer quantize writes, running W8A8."""
    from diffpro_cli.checkpoint import set_submodule
    from diffpro_cli.loading import load_model
    from diffpro_cli.quant.layers import quantize_module
    from diffpro_cli.stages.pair_bound_assumption import measure_pair_bounded_errors
    from diffpro_cli.stages.score_errors import _eps_all, measure_act_errors, measure_layer_errors

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    torch.manual_seed(0)
    model = load_model("builtin:dit-mnist")
    names = ["pos_embed.proj", "transformer_blocks.0.attn1.to_v", "transformer_blocks.1.ff.net.2"]
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([100, 400, 700, 950]), torch.tensor([0, 3, 7, 9])
    act = measure_act_errors(model, names, x, t, y)
    plain = measure_layer_errors(model, names, x, t, y, [8])
    bounded = measure_pair_bounded_errors(model, names, x, t, y, act)
    ref = _eps_all(model, x, t, y, 16)
    layers = model.quantizable_layers()
    for name in names:
        assert set(act[name]) == {"7", "8"} and act[name]["7"] > act[name]["8"] > 0, act[name]
        assert bounded[name] > 0 and bounded[name] != plain[name]["8"]
        float_layer = layers[name][0]
        layer = quantize_module(float_layer, 8, act_bits=8, act_mode="dynamic")
        layer.bound_pairs(float_layer.weight)
        set_submodule(model.net, name, layer.prepare("cpu"))
        try:
            out = _eps_all(model, x, t, y, 16)
        finally:
            set_submodule(model.net, name, float_layer)
        assert layer.act_qmax == 127
        real = float((out - ref).double().square().sum() / ref.double().square().sum())
        predicted = bounded[name] + act[name]["8"]
        assert 0.8 * predicted <= real <= 1.25 * predicted, (name, bounded[name], act[name], real)


def test_score_measure_records_the_assumption_and_vnni_scores_stay_as_before(cli, tmp_path, monkeypatch):
    # catches: scores without the record (allocate could not know), bounded errors measured with the bound
    # off, "off" scores reused as up to date, and scores.json/config changed on a VNNI CPU
    assert cli("profile", "builtin:dit-mnist", *TINY, "--workdir", tmp_path, "-q")[0] == 0
    measure = ["score", "--workdir", tmp_path, "--measure", "--calib-samples", "1", "--calib-timesteps", "1",
               "--bits", "8", "--no-figures", "--json"]
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    code, out, err = cli(*measure)
    assert code == 0, err
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["pair_bound"]["assumed"] is True and doc["pair_bound"]["setting"] == "auto"
    assert doc["pair_bound"]["cpu_vnni"] is False
    for name, layer in doc["layers"].items():
        assert set(layer["measured_error_pair_bounded"]) == {"8"}, name      # every DiT layer is Linear / plain conv
        assert set(layer["measured_act_error"]) == {"7", "8"}, name
    code, out, err = cli(*measure, "--pair-bound", "off")
    assert code == 0 and json.loads(out)["status"] == "computed", err
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["pair_bound"]["assumed"] is False and doc["config"]["pair_bound"] == "off"
    assert not any("measured_error_pair_bounded" in layer for layer in doc["layers"].values())
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)
    code, out, err = cli(*measure)
    assert code == 0, err
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert "pair_bound" not in doc and "pair_bound" not in doc["config"]
    assert all(set(layer["measured_act_error"]) == {"8"} for layer in doc["layers"].values())


def _uniform_plan(assumed: bool | None):
    import diffpro
    from diffpro_cli.stages.quantize import uniform_plan

    model = diffpro.load("random:dit-tiny")
    plan = uniform_plan(model, 8)
    if assumed is not None:
        plan["pair_bound"] = {"setting": "auto", "assumed": assumed, "cpu_vnni": False}
    return model, plan


def test_quantize_notes_a_plan_priced_under_another_pair_bound(monkeypatch):
    # catches: silence when --pair-bound off leaves bounded-priced layers on the 7-bit grid, a note on every
    # default run (GPTQ included: it is bounded too), and the float-activation layers counted as bounded
    from diffpro_cli.stages.pair_bound_assumption import bounded_layers_of_plan, pair_bound_note

    model, plan = _uniform_plan(True)
    covered = bounded_layers_of_plan(plan, model)
    integer = [n for n, e in plan["layers"].items() if e["act_bits"] < 16]
    assert covered == integer and len(integer) < len(plan["layers"])       # float-act layers: not bounded
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    assert pair_bound_note(plan, model, "auto") is None                    # as priced, any rounding
    level, line = pair_bound_note(plan, model, "off")
    assert level == "warn" and "--pair-bound off" in line and f"leaves all {len(covered)} of them" in line
    model, plan = _uniform_plan(False)
    level, line = pair_bound_note(plan, model, "auto")                     # priced on the 7-bit grid, run bounded
    assert level == "info" and f"bounds {len(covered)} of them" in line
    assert pair_bound_note(plan, model, "off") is None
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)
    model, plan = _uniform_plan(None)                                      # a VNNI plan, default quantize
    assert pair_bound_note(plan, model, "auto") is None


def test_quantize_cli_prints_the_mismatch_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    _, plan = _uniform_plan(True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, _, err = cli("quantize", "random:dit-tiny", "--plan", tmp_path / "plan.json", "--pair-bound", "off", "-w", tmp_path)
    assert code == 0, err
    assert sum("priced" in line and "pair-bounded" in line for line in err.splitlines()) == 1


@pytest.mark.parametrize("pair_bound", ["auto", "off"])
def test_gptq_quantize_without_vnni_bounds_its_linear_layers_and_warns_only_when_off(cli, tmp_path, monkeypatch, pair_bound):
    # catches: GPTQ layers left unbounded on the 7-bit grid (the plan priced them bounded), a stale
    # "--rounding gptq" warning, bounded weights that still saturate, and "off" bounding anyway
    from diffpro_cli.quant.pair_bound import PAIR_BOUND

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    _, plan = _uniform_plan(True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "q"
    code, _, err = cli("quantize", "random:dit-tiny", "--plan", tmp_path / "plan.json", "--rounding", "gptq",
                       "--pair-bound", pair_bound, "--calib-samples", "1", "-w", tmp_path, "--out", out)
    assert code == 0, err
    warned = sum("priced" in line and "pair-bounded" in line for line in err.splitlines())
    assert warned == (pair_bound == "off"), err
    layers = json.loads((out / "diffpro.json").read_text())["layers"]
    gptq = [n for n, r in layers.items() if r["rounding"] == "gptq" and r["act_mode"] != "none"]
    assert gptq and all(layers[n]["pair_bounded"] is (pair_bound == "auto") for n in gptq)
    from diffpro_cli.checkpoint import load_quantized

    loaded = dict(load_quantized(out, keep_integers=True).net.named_modules())
    q = loaded[gptq[0]].int_weight().int()
    pairs = (q[:, 0::2].abs() + q[:, 1::2].abs()).max()
    assert (int(pairs) <= PAIR_BOUND) is (pair_bound == "auto")
