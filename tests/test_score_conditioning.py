"""score --measure recomputes layer errors on the calibration inputs: with other prompt embeddings than the
profile was made on, it measured something else and said nothing (profile.json recorded no conditioning).
The profile now records its input hash (the model with its conditioning) and score refuses a mismatch."""

import json

from test_pipeline_parity import build


def _cond(path, emb, scale):
    from safetensors.torch import save_file

    save_file({k: (v * scale).contiguous() for k, v in emb.items()}, str(path))
    return path


def test_score_measure_refuses_conditioning_other_than_the_profiles(tmp_path, cli):
    # catches: score --measure on other prompts than profiled (silently), and a false refusal on the same ones
    path, _, emb = build("pixart", tmp_path / "model")
    same, other = _cond(tmp_path / "a.safetensors", emb, 1.0), _cond(tmp_path / "b.safetensors", emb, 2.0)
    work = tmp_path / "w"
    code, _, err = cli("profile", path, "-w", work, "--conditioning", same, "--samples", 2, "--batch", 2,
                       "--timesteps", "999:0:500", "-q")
    assert code == 0, err
    assert json.loads((work / "profile" / "profile.json").read_text())["inputs_sha256"]
    code, _, err = cli("score", "--model", path, "-w", work, "--conditioning", other, "--measure", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3 and len(lines) == 1 and "profiled with other conditioning" in lines[0], err
    assert not (work / "scores.json").exists()
    code, _, err = cli("score", "--model", path, "-w", work, "--conditioning", same, "--measure", "-q")
    assert code == 0, err
    assert (work / "scores.json").exists()
