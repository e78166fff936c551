"""A quantized checkpoint whose diffpro.json holds a layer record no layer can be built from is bad
input (exit 3, naming the file and layer), not a bad option (exit 2) or a traceback."""

import json
import shutil

import pytest

from diffpro_cli.errors import InputError


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    from diffpro_cli.checkpoint import save_quantized
    from diffpro_cli.loading import load_model
    from diffpro_cli.stages.quantize import uniform_plan

    root = tmp_path_factory.mktemp("corrupt")
    model = load_model("random:dit-tiny")
    save_quantized(model, uniform_plan(model, 8), root / "q")
    return root / "q"


CORRUPTIONS = {
    "weight_bits_5": lambda rec: rec.update(weight_bits=5),          # was UsageError, exit 2
    "group_size_not_a_divisor": lambda rec: rec.update(group_size=7),  # was UsageError, exit 2
    "unknown_act_mode": lambda rec: rec.update(act_mode="bogus"),     # was accepted and run
    "unknown_type": lambda rec: rec.update(type="foo"),               # was built as a conv
    "missing_field": lambda rec: rec.pop("weight_bits"),             # was a KeyError traceback
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_layer_record_is_input_error_naming_the_file(qdir, tmp_path, cli, case):
    """Bugs caught: weight_bits 5 (or a group size that does not divide) in a checkpoint exiting 2 with
    the quantize option's advice ('omit --group-size'), as if the user had mistyped an option; an
    unknown act_mode or layer type loading and running; a missing field ending in a traceback."""
    bad = tmp_path / "bad"
    shutil.copytree(qdir, bad)
    meta = json.loads((bad / "diffpro.json").read_text())
    name = next(iter(meta["layers"]))
    CORRUPTIONS[case](meta["layers"][name])
    (bad / "diffpro.json").write_text(json.dumps(meta))
    code, _, err = cli("sample", bad, "--steps", 2, "--n", 1, "--out", tmp_path / "s.png")
    assert code == InputError.exit_code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(bad / "diffpro.json") in lines[0] and name in lines[0] and "diffpro quantize" in lines[0]
    assert not list(tmp_path.glob("s*"))     # nothing written


def test_the_intact_checkpoint_samples(qdir, tmp_path, cli):
    """Bug caught: the record checks refusing records diffpro itself writes."""
    code, _, err = cli("sample", qdir, "--steps", 2, "--n", 1, "--out", tmp_path / "s.png")
    assert code == 0, err
    assert (tmp_path / "s.png").exists()
