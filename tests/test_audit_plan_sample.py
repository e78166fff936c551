"""`diffpro sample` fed odd options, blocked outputs and timesteps.json files made for other models: each is
one `error:` line with its documented exit code before any sampling, and nothing is half-written."""

import json

import pytest
from test_bad_input_audit import TINY, _one_error_line


def test_flow_model_samples_with_euler_the_method_its_own_error_names(cli, tmp_path):
    """sample --method euler was refused ('use ddim or ddpm') although a flow model's ddpm error says
    'use euler': the user was sent in a circle."""
    code, _, err = cli("sample", "builtin:flow-mnist", "--method", "ddpm", "--steps", "2", "--n", "1",
                       "--out", tmp_path / "a.png", "-q")
    assert code == 2 and "use euler" in _one_error_line(err)
    code, _, err = cli("sample", "builtin:flow-mnist", "--method", "euler", "--steps", "2", "--n", "1",
                       "--out", tmp_path / "f.png", "-q")
    assert code == 0, err
    assert (tmp_path / "f.png").is_file() and (tmp_path / "f.safetensors").is_file()
    code, _, err = cli("sample", TINY, "--method", "euler", "--steps", "2", "--n", "1", "--out", tmp_path / "e.png", "-q")
    assert code == 2 and "use ddim or ddpm" in _one_error_line(err)   # euler stays a flow-only sampler


@pytest.mark.parametrize("args,needle", [(["--eta", "-1"], "--eta -1.0"), (["--eta", "nan"], "--eta nan"),
                                         (["--eta", "2"], "--eta 2.0"), (["--cfg", "nan"], "--cfg nan")])
def test_eta_and_guidance_outside_their_range_are_usage_errors(cli, tmp_path, args, needle):
    """A negative or NaN eta (DDIM then dropped or bent its noise term) and a NaN guidance scale (NaN samples)
    were sampled with, exit 0."""
    code, _, err = cli("sample", TINY, "--steps", "2", "--n", "1", *args, "--out", tmp_path / "g.png", "-q")
    assert code == 2 and needle in _one_error_line(err)
    assert not (tmp_path / "g.png").exists()


def test_blocked_raw_samples_path_fails_before_the_grid_is_written(cli, tmp_path):
    """--out g.png with a directory g.safetensors: the grid was written, then the raw samples failed
    (exit 2), leaving half of the output behind."""
    (tmp_path / "g.safetensors").mkdir()
    code, _, err = cli("sample", TINY, "--steps", "2", "--n", "1", "--out", tmp_path / "g.png", "-q")
    assert code == 2 and "g.safetensors: cannot write there" in _one_error_line(err)
    assert not (tmp_path / "g.png").exists()


def _timesteps_file(path, model_record):
    doc = {"schema": "diffpro.timesteps/1", "timesteps": [0, 500, 999]} | ({} if model_record is None else {"model": model_record})
    path.write_text(json.dumps(doc))
    return path


def test_timesteps_pruned_for_another_model_are_refused_like_quantize_and_bench_refuse_them(cli, tmp_path):
    """sample --timesteps took a timesteps.json pruned for another model silently (quantize and bench refuse
    it, exit 3), and a 'model' that is not an object must be bad input, not a crash."""
    foreign = _timesteps_file(tmp_path / "foreign.json", {"spec": "builtin:dit-mnist", "sha256": "ab" * 32})
    code, _, err = cli("sample", TINY, "--n", "1", "--timesteps", foreign, "--out", tmp_path / "g.png", "-q")
    assert code == 3 and "made for another model" in _one_error_line(err) and "foreign.json" in err
    assert not (tmp_path / "g.png").exists()
    odd = _timesteps_file(tmp_path / "odd.json", "builtin:dit-mnist")
    code, _, err = cli("sample", TINY, "--n", "1", "--timesteps", odd, "--out", tmp_path / "g.png", "-q")
    assert code == 3 and "'model' record is not a JSON object" in _one_error_line(err)


def test_quantized_checkpoint_takes_the_timesteps_pruned_for_its_float_model(cli, tmp_path):
    """The model check must accept the usual flow: prune the float model, quantize it, sample the checkpoint
    on the pruned steps (and still refuse another model's file)."""
    import diffpro

    q = tmp_path / "q"
    code, _, err = cli("quantize", TINY, "--bits", "8", "--out", q, "-w", tmp_path / "w", "-q", "--calib-samples", "1")
    assert code == 0, err
    own = _timesteps_file(tmp_path / "own.json", {"spec": TINY, "sha256": diffpro.load(TINY).sha256})
    code, out, err = cli("sample", q, "--n", "1", "--timesteps", own, "--out", tmp_path / "q.png", "--json", "-q")
    assert code == 0 and json.loads(out)["steps"] == 3, err
    unrecorded = _timesteps_file(tmp_path / "plain.json", None)   # hand-written lists carry no model: accepted
    code, _, err = cli("sample", q, "--n", "1", "--timesteps", unrecorded, "--out", tmp_path / "p.png", "-q")
    assert code == 0, err
    foreign = _timesteps_file(tmp_path / "foreign.json", {"spec": "builtin:dit-mnist", "sha256": "ab" * 32})
    code, _, err = cli("sample", q, "--n", "1", "--timesteps", foreign, "--out", tmp_path / "f.png", "-q")
    assert code == 3 and "made for another model" in _one_error_line(err)


def test_labels_on_a_text_conditioned_model_point_to_prompts(cli, tmp_path):
    """sample builtin:flow-mnist --labels 3 said the text-conditioned model 'is unconditional'."""
    code, _, err = cli("sample", "builtin:flow-mnist", "--labels", "3", "--steps", "2", "--n", "1",
                       "--out", tmp_path / "g.png", "-q")
    line = _one_error_line(err)
    assert code == 2 and "conditioned on text" in line and "--prompts" in line and "unconditional" not in line


def test_a_quantized_checkpoint_samples_on_its_own_timesteps_by_default(cli, tmp_path):
    """quantize --timesteps stores the pruned steps in the checkpoint and bench's diffpro row runs them, but
    `diffpro sample QDIR` ran 50 uniform steps (docs/api.md: sample work/quantized runs the plan's steps)."""
    steps = _timesteps_file(tmp_path / "t.json", None)   # [0, 500, 999]
    q = tmp_path / "q"
    code, _, err = cli("quantize", TINY, "--bits", "8", "--timesteps", steps, "--out", q, "-w", tmp_path / "w", "-q",
                       "--calib-samples", "1")
    assert code == 0, err
    code, out, err = cli("sample", q, "--n", "1", "--out", tmp_path / "a.png", "--json", "-q")
    assert code == 0 and json.loads(out)["steps"] == 3, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["timesteps"] == "0,500,999"
    code, out, err = cli("sample", q, "--n", "1", "--steps", "4", "--out", tmp_path / "b.png", "--json", "-q")
    assert code == 0 and json.loads(out)["steps"] == 4, err       # an explicit --steps still wins
