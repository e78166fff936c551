import json

import pytest


def _one_error_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    # the first word of each line under "Commands" (plain click help, or rich's boxed panel)
    listed = {line.strip(" │").split()[0] for line in out.split("Commands")[-1].splitlines()[1:] if line.strip(" │╭╰─")}
    expected = {"profile", "score", "prune", "allocate", "quantize", "bench", "run", "sample", "train", "fid-stats", "models"}
    assert expected <= listed, listed


def test_version_is_the_project_version(cli):
    import tomllib
    from pathlib import Path

    import diffpro_cli

    code, out, _ = cli("--version")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.exists() else diffpro_cli.__version__
    assert code == 0 and out.strip() == f"diffpro {version}"


def test_sample_writes_grid_and_raw(cli, tmp_path):
    out = tmp_path / "g.png"
    code, stdout, _ = cli("sample", "builtin:dit-mnist", "--steps", "3", "--n", "4", "--out", out, "--json", "--batch", "3")
    assert code == 0
    res = json.loads(stdout)
    assert res["n"] == 4 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "g.safetensors"))
    assert raw["samples"].shape == (4, 1, 32, 32)
    assert raw["labels"].tolist() == [0, 1, 2, 3]


def test_sample_same_seed_same_samples_any_batch(cli, tmp_path):
    from safetensors.torch import load_file

    for b in ("1", "4"):
        assert cli("sample", "--steps", "2", "--n", "4", "--batch", b, "--out", tmp_path / f"b{b}.png", "-q")[0] == 0
    a, b = (load_file(str(tmp_path / f"b{b}.safetensors"))["samples"] for b in ("1", "4"))
    # identical noise; only GEMM blocking differs with batch size (~1e-6 in eps, amplified by 1/sqrt(ᾱ) at t=999)
    assert (a - b).abs().max() < 1e-3


@pytest.mark.parametrize("args,code,needle", [
    (["sample", "nope/model.pt"], 3, "no such model"),
    (["sample", "builtin:nope"], 3, "unknown built-in"),
    (["sample", "--method", "euler", "--steps", "2", "--n", "1"], 2, "unknown sampler"),
    (["sample", "--steps", "0"], 2, "--steps 0"),
    (["sample", "--labels", "3,x"], 2, "--labels"),
    (["sample", "--labels", "12"], 2, "classes must be"),
    (["sample", "some.module:factory"], 5, "--trust-code"),
])
def test_bad_sample_input_exits_with_its_code_and_one_error_line(cli, tmp_path, args, code, needle):
    rc, _, err = cli(*args, "--out", tmp_path / "x.png")
    assert rc == code, err
    assert needle in _one_error_line(err)
    assert not (tmp_path / "x.png").exists()


def test_sample_refuses_unknown_timesteps_schema_and_runs_a_valid_file(cli, tmp_path):
    bad = tmp_path / "timesteps.json"
    bad.write_text(json.dumps({"schema": "diffpro.timesteps/7", "timesteps": [0, 10]}))
    rc, _, err = cli("sample", "--timesteps", bad, "--out", tmp_path / "x.png")
    assert rc == 3 and "cannot be read" in _one_error_line(err)
    good = tmp_path / "t2.json"
    good.write_text(json.dumps({"schema": "diffpro.timesteps/1", "timesteps": [0, 500, 999]}))
    rc, out, _ = cli("sample", "--timesteps", good, "--n", "2", "--out", tmp_path / "y.png", "--json")
    assert rc == 0 and json.loads(out)["steps"] == 3


def test_unknown_option_is_usage_error(cli):
    rc, _, err = cli("sample", "--bogus")
    line = _one_error_line(err)   # catches: click's three-line Usage/Try/Error block instead of one error line
    assert rc == 2 and "No such option: --bogus" in line and "diffpro sample --help" in line
    rc, _, err = cli("sample", "builtin:dit-mnist", "--n", "lots")
    assert rc == 2 and "Invalid value for '--n'" in _one_error_line(err)


def test_bench_fid_on_random_weights_stops_before_writing_baselines(cli, tmp_path):
    """Catches: the refusal coming after the uniform baselines were quantized and written (minutes of work
    and files left for a run that could never start)."""
    code, _, err = cli("bench", "random:dit-tiny", "--workdir", tmp_path / "w", "--fid", "--rows", "fp32,w8a8-uniform")
    assert code == 2 and "random weights" in _one_error_line(err)
    assert not (tmp_path / "w" / "bench").exists()


def test_models_lists_the_random_architectures_too(cli):
    code, out, _ = cli("models")
    assert code == 0 and "random:dit-xl-2" in out and "builtin:flow-mnist" in out   # catches: human output dropping them


@pytest.mark.parametrize("args, needle", [(["sample", "builtin:dit-mnist", "--out", "g.jpg"], ".png"),
                                          (["train", "dit-mnist", "--lr", "-1"], "--lr"),
                                          (["train", "dit-mnist", "--threads", "0"], "--threads")])
def test_options_that_would_be_ignored_or_crash_later_are_refused_at_once(cli, tmp_path, args, needle):
    """Catches: a PNG written under a .jpg name; training started with a negative learning rate or 0 threads."""
    code, _, err = cli(*args)
    assert code == 2 and needle in _one_error_line(err)


def test_weights_without_a_factory_model_is_refused_not_ignored(cli, tmp_path):
    """Catches: --weights silently ignored for a model that brings its own (the user believes their
    weights were used)."""
    code, _, err = cli("models", "builtin:dit-mnist", "--weights", tmp_path / "w.pt")
    assert code == 2 and "--weights is for module:factory" in _one_error_line(err)


def test_no_library_import_warnings_with_torchao_installed(tmp_path):
    """With torchao installed (the `torchao` extra), importing diffusers printed three warnings before
    every command's output and on `import diffpro` (torch on torchao's Enum registrations, diffusers' torchao quantizer on moved
    tensor classes). A fresh process: the warnings come once per process, at the first diffusers import."""
    import subprocess
    import sys

    pytest.importorskip("torchao")
    proc = subprocess.run([sys.executable, "-m", "diffpro_cli", "sample", "--steps", "1", "--n", "1", "--out",
                           str(tmp_path / "g.png"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    lib = subprocess.run([sys.executable, "-c", "import diffpro; diffpro.load('builtin:dit-mnist')"],
                         capture_output=True, text=True, timeout=300)   # the library face too
    assert lib.returncode == 0 and lib.stderr.strip() == "", lib.stderr
