"""Audit of the analysis surfaces: `diffpro score` reading a damaged profile, odd score options.

One random:dit-tiny profile (2 samples, one timestep) is made per module and copied per test.
"""

import json
import shutil
import warnings

import pytest

from diffpro_cli.app import main


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    work = tmp_path_factory.mktemp("prof")
    assert main(["profile", "random:dit-tiny", "-w", str(work), "--samples", "2", "--timesteps", "3", "-q"]) == 0
    return work


@pytest.fixture
def work(profiled, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(profiled, dst)
    return dst


def _edit_profile(work, edit):
    path = work / "profile" / "profile.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, needle", [
    # every one of these was a traceback (exit 1) before the fix
    (lambda d: d.update(layers=[]), "lists no layers"),                              # IndexError in the figures
    (lambda d: d["layers"].__setitem__(0, {}), "layer #0 has no name"),              # KeyError 'name'
    (lambda d: d["layers"][0].pop("in_features"), "in_features None"),              # KeyError 'in_features'
    (lambda d: d["layers"][0].update(in_features="x"), "in_features 'x'"),          # ValueError from int()
    (lambda d: d["layers"][1].update(name=d["layers"][0]["name"]), "listed twice"),  # silently scored one layer
    (lambda d: d["layers"].__setitem__(2, 3), "layer #2 is not an object"),        # TypeError
    (lambda d: d["calibration"].update(seed=None), "seed None"),                     # TypeError from int(None)
])
def test_damaged_profile_json_is_one_input_error(cli, work, edit, needle):
    _edit_profile(work, edit)
    code, _, err = cli("score", "-w", work, "-q")
    assert code == 3, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err and not (work / "scores.json").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_component_weight_is_refused(cli, work, value):
    """Was accepted: every combined score became NaN (or +-inf), written into scores.json as bare NaN
    (not JSON) and planned on by allocate."""
    code, _, err = cli("score", "-w", work, "--component-weights", f"pca={value}", "-q")
    assert code == 2 and "finite" in err and not (work / "scores.json").exists()


def test_measure_on_a_constant_signal_prints_nothing_under_quiet(cli, work):
    """One profiled timestep makes range_variability the same for every layer: scipy's
    ConstantInputWarning (with a source line) leaked onto stderr under --quiet; rho is recorded as null."""
    with warnings.catch_warnings(record=True) as caught:   # pytest would otherwise swallow the warning
        warnings.simplefilter("always")
        code, _, err = cli("score", "-w", work, "--measure", "--bits", "8", "--calib-samples", "1",
                           "--calib-timesteps", "1", "-q")
    assert code == 0 and err == ""
    assert not [w for w in caught if "constant" in str(w.message).lower()]
    doc = json.loads((work / "scores.json").read_text())
    assert doc["validation"]["spearman"]["8"]["range_variability"] == {"rho": None, "p": None}
    assert doc["validation"]["spearman"]["8"]["combined_score"]["rho"] is not None


def test_bad_classes_fail_before_the_stage_says_recomputing(cli, work):
    """A bad --classes on an existing profile printed 'profile: recomputing (config changed: classes)'
    and only then the error: it is checked with the other options now, the profile left as it was."""
    before = (work / "profile" / "profile.json").read_bytes()
    code, out, err = cli("profile", "random:dit-tiny", "-w", work, "--samples", "2", "--timesteps", "3", "--classes", "99")
    assert code == 2 and "--classes" in err and "recomputing" not in out + err
    assert (work / "profile" / "profile.json").read_bytes() == before


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_non_finite_cfg_is_a_usage_error_not_blamed_on_the_weights(cli, tmp_path, scale):
    """`profile --cfg nan` sampled NaN latents and stopped with 'layer pos_embed.proj sees NaN/Inf
    activations; check the model weights' (exit 3): the option is refused now, nothing written."""
    code, _, err = cli("profile", "random:dit-tiny", "-w", tmp_path / "w", "--samples", "2", "--timesteps", "999,3",
                       "--cfg", scale, "-q")
    assert code == 2 and "--cfg" in err and "weights" not in err, err
    assert not (tmp_path / "w" / "profile" / "profile.json").exists()
