"""A joint plan (allocate --budget latency=F) chooses its step count with its bits: quantize and bench must
keep that choice. `run` and a plain `diffpro bench` passed WORKDIR/timesteps.json (prune's subset), which
silently replaced the plan's steps in the checkpoint and in the diffpro row."""

import json
import shutil

from diffpro_cli.stages.bench_options import default_timesteps


def _timesteps_doc(ts):
    return {"schema": "diffpro.timesteps/1", "num_train_timesteps": 1000, "timesteps": ts}


def test_quantize_keeps_a_joint_plans_steps_over_the_timesteps_file(tiny_allocated, tmp_path, cli):
    work = tmp_path / "w"
    shutil.copytree(tiny_allocated, work)
    plan = json.loads((work / "plan.json").read_text())
    plan["timesteps"] = [0, 333, 666, 999]
    plan["joint"] = {"steps": 4}
    (work / "plan.json").write_text(json.dumps(plan))
    (work / "timesteps.json").write_text(json.dumps(_timesteps_doc(list(range(0, 1000, 125)))))   # prune's 8
    code, out, err = cli("quantize", "random:dit-tiny", "-w", work, "--plan", work / "plan.json",
                         "--timesteps", work / "timesteps.json", "-q")
    assert code == 0, err
    meta = json.loads((work / "quantized" / "diffpro.json").read_text())
    assert meta["timesteps"] == [0, 333, 666, 999]
    assert "chose 4 steps jointly" in err and "8 are not used" in err
    # bench's default: the file disagrees with the checkpoint, so the diffpro row takes the checkpoint's
    assert default_timesteps(work, work / "quantized") is None


def test_bench_takes_the_timesteps_file_where_it_holds_the_checkpoints_steps(tmp_path):
    (tmp_path / "quantized").mkdir()
    (tmp_path / "timesteps.json").write_text(json.dumps(_timesteps_doc([0, 500, 999])))
    assert default_timesteps(tmp_path, None) == tmp_path / "timesteps.json"        # no checkpoint
    (tmp_path / "quantized" / "diffpro.json").write_text(json.dumps({"timesteps": [0, 500, 999]}))
    assert default_timesteps(tmp_path, tmp_path / "quantized") == tmp_path / "timesteps.json"
    (tmp_path / "quantized" / "diffpro.json").write_text(json.dumps({"timesteps": None}))
    assert default_timesteps(tmp_path, tmp_path / "quantized") == tmp_path / "timesteps.json"
    (tmp_path / "timesteps.json").unlink()
    assert default_timesteps(tmp_path, tmp_path / "quantized") is None
