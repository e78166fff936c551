"""allocate's measured check against the float step cut (stages/allocate_check.py): the plan and float
DDIM at the plan's predicted latency, measured end to end in one unit against fp32; with a joint latency
budget the step count is the one measured closest to fp32."""

import json
import shutil

import numpy as np
import pytest

from diffpro_cli.stages.allocate_check import paired_verdict, select_measured, verdict_line

FAST = ["--batch", "1", "--repeats", "1", "--full-steps", "8", "--check-n", "4", "-q"]


@pytest.fixture
def work(tiny_pruned, tmp_path):
    """A private copy of conftest's profiled, scored random:dit-tiny workdir pruned to 2, 4 and 6 steps."""
    dst = tmp_path / "w"
    shutil.copytree(tiny_pruned, dst)
    return dst


def _plan(work) -> dict:
    return json.loads((work / "plan.json").read_text())


def test_float_plan_measures_as_float_on_its_own_timesteps(cli, work):
    """A plan that keeps every layer fp32 is the float model: its measured distance must equal the float
    model's on the same timesteps (catches the plan sampled with other seeds, labels or sampler than the
    float rows, or a network changed by the in-memory quantization), and its float step cut is itself."""
    code, _, err = cli("allocate", "-w", work, "--budget", "size-mb=1000", "--bits", "16", "--act-bits", "16",
                       "--timesteps", work / "timesteps.json", "--check-metric", "mse", *FAST)
    assert code == 0, err
    rec = _plan(work)["step_cut_check"]
    assert rec["metric"] == "mse" and rec["n"] == 4 and rec["plan"]["steps"] == 4
    assert rec["plan"]["distance"] == rec["float_same_timesteps"]["distance"]
    assert rec["float_step_cut"]["predicted_steps"] == _plan(work)["baseline_check"]["float_steps_same_latency"] == 4
    assert rec["verdict"].startswith("measured against fp32 (mse, 4 samples)")
    # the cut's steps come from the measured forwards (the same float network twice here: about 1x)
    fw = rec["forward"]
    assert fw["float_dtype"] == "float32" and fw["plan_ms"] > 0 and fw["float_ms"] > 0
    assert rec["float_step_cut"]["steps"] == max(1, min(8, int(4 * fw["plan_ms"] / fw["float_ms"] + 1e-9)))


def test_quantized_plan_is_measured_quantized(cli, work):
    """A 4-bit plan's samples differ from the float model's on the same timesteps (the check ran the
    quantized network, not the float one); every distance is finite and non-negative."""
    code, _, err = cli("allocate", "-w", work, "--budget", "avg-bits=5", "--bits", "4,8", "--protect", "none",
                       "--timesteps", work / "timesteps.json", "--check-metric", "mse", *FAST)
    assert code == 0, err
    rec = _plan(work)["step_cut_check"]
    d = [rec["plan"]["distance"], rec["float_same_timesteps"]["distance"], rec["float_step_cut"]["distance"]]
    assert all(np.isfinite(v) and v >= 0 for v in d)
    assert rec["plan"]["distance"] != rec["float_same_timesteps"]["distance"]


def test_joint_plan_keeps_the_step_count_measured_closest(cli, work):
    """--budget latency=F: every feasible step count's plan is measured, the written plan is the one closest
    to fp32 (its timesteps, its steps, its distance), and the predicted choice is recorded beside it."""
    code, _, err = cli("allocate", "-w", work, "--budget", "latency=0.9", "--check-metric", "mse", *FAST)
    assert code == 0, err
    plan = _plan(work)
    joint, rec = plan["joint"], plan["step_cut_check"]
    measured = {c["steps"]: c["measured_distance"] for c in joint["candidates"] if c["feasible"]}
    assert len(measured) >= 2 and all(c.get("measured_distance") is None for c in joint["candidates"] if not c["feasible"])
    best = min(measured, key=lambda k: (measured[k], k))
    assert joint["steps"] == best == len(plan["timesteps"]) == rec["plan"]["steps"]
    assert rec["plan"]["distance"] == pytest.approx(measured[best])
    assert joint["selected_by"] == "measured distance to fp32" and joint["predicted_choice"] in measured


def test_no_check_and_bad_check_options(cli, work):
    code, _, err = cli("allocate", "-w", work, "--budget", "avg-bits=6", "--no-check", *FAST)
    assert code == 0 and "step_cut_check" not in _plan(work), err
    (work / "plan.json").unlink()
    for args, needle in ((["--check-n", "1"], "--check-n 1"), (["--check-metric", "fid"], "--check-metric fid")):
        code, out, err = cli("allocate", "-w", work, "--budget", "avg-bits=6", *args, "--batch", "1")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
        assert not (work / "plan.json").exists()


def test_without_steps_the_check_says_why(cli, tiny_allocated, tmp_path):
    """No timesteps.json: nothing to compare at a step count; the record says so instead of failing."""
    work = tmp_path / "w"
    shutil.copytree(tiny_allocated, work)
    code, _, err = cli("allocate", "-w", work, "--budget", "avg-bits=5", "--batch", "1", "--repeats", "1", "-q")
    assert code == 0, err
    assert "--timesteps" in _plan(work)["step_cut_check"]["skipped"]


def test_paired_verdict_sign_and_significance():
    """Who is closer follows the sign of (cut - plan); overlapping noise is no verdict."""
    rng = np.random.default_rng(0)
    plan = rng.uniform(1, 2, 32)
    assert paired_verdict(plan, plan + 1.0, seed=0)["closer_to_fp32"] == "plan"
    assert paired_verdict(plan + 1.0, plan, seed=0)["closer_to_fp32"] == "float step cut"
    noisy = paired_verdict(plan, plan + rng.normal(0, 0.01, 32), seed=0)
    assert noisy["closer_to_fp32"] is None and noisy["ci95"][0] < 0 < noisy["ci95"][1]


def test_select_measured_least_distance_then_fewer_steps():
    c = [{"steps": 8, "distance": 0.2}, {"steps": 16, "distance": 0.1}, {"steps": 12, "distance": 0.1},
         {"steps": 4, "distance": None}]
    assert select_measured(c)["steps"] == 12


def test_verdict_names_the_size_budget_when_float_steps_win():
    rec = {"metric": "inception", "n": 16, "plan": {"steps": 25, "distance": 2.0},
           "float_step_cut": {"steps": 12, "distance": 1.0}, "paired": {"closer_to_fp32": "float step cut"},
           "forward": {"plan_speedup": 0.5, "float_dtype": "bfloat16"}}
    line = verdict_line(rec, "avg-bits=4.4")
    assert "FEWER FLOAT STEPS WIN" in line and "avg-bits=4.4 excludes" in line and "12 steps" in line
    assert "2.00x SLOWER than bfloat16's" in line
    rec["forward"]["plan_speedup"] = 2.0
    assert "its forward 2.00x bfloat16's" in verdict_line(rec, None)
    assert "joint plan" in verdict_line(rec, None)
    rec["paired"]["closer_to_fp32"] = "plan"
    assert verdict_line(rec, None).endswith("the plan is closer to fp32")


def test_the_checks_verdict_travels_to_the_checkpoint_and_the_bench_row(cli, work):
    """quantize records the plan's check and bench shows it on the diffpro row, beside what bench measures
    (catches a verdict that stays in plan.json where a bench reader never looks)."""
    assert cli("allocate", "-w", work, "--budget", "avg-bits=6", "--timesteps", work / "timesteps.json",
               "--check-metric", "mse", *FAST)[0] == 0
    verdict = _plan(work)["step_cut_check"]["verdict"]
    code, _, err = cli("quantize", "random:dit-tiny", "-w", work, "--plan", work / "plan.json", "-q")
    assert code == 0, err
    meta = json.loads((work / "quantized" / "diffpro.json").read_text())
    assert meta["provenance"]["plan_check"] == verdict
    code, _, err = cli("bench", "random:dit-tiny", "-w", work, "--rows", "diffpro", "--repeats", "1", "--no-fid",
                       "--latency-batch", "1", "--latency-steps", "1", "--reference-steps", "8", "-q")
    assert code == 0, err
    row = next(r for r in json.loads((work / "bench" / "report.json").read_text())["rows"] if r["name"] == "diffpro")
    assert f"allocate's check before quantize: {verdict}" in row["notes"]
