"""allocate as a stage and a command: the CLI's errors and outputs, the cost table (round trip, refusal
of another machine's), the stage's inputs and early checks. Synthetic scores (test_allocate.make_scores)
and injected or hand-made latencies: no kernels timed except in the conv round trip."""

import json

import pytest

from diffpro_cli.errors import UsageError
from diffpro_cli.planning.options import Layer, Option, load_layers
from diffpro_cli.stages.allocate import AllocateConfig, run_allocate
from test_allocate import fake_latency, make_scores

@pytest.fixture
def scores_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(make_scores(n=8, seed=7)))
    return path


CLI_FAST = ["--latency-source", "analytic", "--remainder-ms", "0", "--repeats", "1"]


def test_cli_infeasible_budget_one_line_and_nothing_written(cli, scores_file, tmp_path):
    work = tmp_path / "w"
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=1.5", *CLI_FAST)
    assert code == 4
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "smallest feasible is avg-bits=" in lines[0]
    assert not (work / "plan.json").exists()
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bit=5", *CLI_FAST)
    assert code == 2 and err.count("error:") == 1 and not (work / "plan.json").exists()
    code, out, err = cli("allocate", tmp_path / "missing.json", "-w", work, "--budget", "avg-bits=5", *CLI_FAST)
    assert code == 3 and err.count("error:") == 1
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=5", "--min-speedup", "0", *CLI_FAST)
    assert code == 2 and err.count("error:") == 1 and "--min-speedup" in err and not (work / "plan.json").exists()
    # a bad option with no scores yet: the option's line (exit 2), not 'scores.json: no such file' (exit 3)
    code, out, err = cli("allocate", "-w", tmp_path / "empty", "--budget", "latency=2", *CLI_FAST)
    assert code == 2 and err.count("error:") == 1 and "latency=2" in err


def synthetic_cost_table(scores: dict, latency=None, fingerprint: dict | None = None) -> dict:
    """A cost-table document for the synthetic layers, stamped with this machine's fingerprint."""
    from diffpro_cli.planning.costs import COST_SCHEMA, path_label
    from diffpro_cli.planning.fingerprint import machine_fingerprint

    latency = latency or fake_latency
    rows = {}
    for layer in load_layers(scores):
        opts = [Option(16, 16, "dynamic", None)] + [Option(w, a, "dynamic", None) for w in (2, 3, 4, 6, 8) for a in (8, 16)]
        rows[layer.name] = {"kind": "Linear", "input_shape": [16, layer.in_features],
                            "ms": {path_label(o): latency(layer, o) for o in opts}}
    return {"schema": COST_SCHEMA, "fingerprint": fingerprint or machine_fingerprint(), "batch": 8,
            "model": scores["model"], "layers": rows, "forward_ms": 1.0, "remainder_ms": 0.0}


def test_cli_writes_plan_with_explicit_cost_table_skips_when_up_to_date_and_pareto(cli, scores_file, tmp_path):
    work = tmp_path / "w"
    table = tmp_path / "cost.json"
    table.write_text(json.dumps(synthetic_cost_table(json.loads(scores_file.read_text()))))
    args = ["--cost-table", table, "--repeats", "1"]
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=6", "--pareto", "--json", *args)
    assert code == 0, err
    result = json.loads(out)
    plan = json.loads((work / "plan.json").read_text())
    assert plan["schema"] == "diffpro.plan/1" and plan["totals"]["avg_bits"] <= 6
    assert result["totals"]["avg_bits"] == plan["totals"]["avg_bits"]
    assert plan["totals"]["latency_source"] == "measured" and plan["cost_table"]["path"] == str(table)
    for entry in plan["layers"].values():
        assert entry["weight_bits"] in (4, 8, 16) and entry["act_bits"] in (8, 16) and entry["act_mode"] == "dynamic"
    pareto = json.loads((work / "pareto.json").read_text())
    assert pareto["front"] and (work / "figures" / "pareto.png").stat().st_size > 1000
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=6", "--pareto", *args)
    assert code == 0 and "up to date" in err
    # the same budget spelled otherwise: the lock compared the raw string and recomputed
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", " AVG-BITS=6.0 ,", "--pareto", *args)
    assert code == 0 and "up to date" in err
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=6.0001", "--pareto", *args)
    assert code == 0 and "up to date" not in err and "budget" in err


def _refused_table_of(cli, scores_file, tmp_path, **fingerprint):
    """WORKDIR/cost_table.json stamped with this machine's fingerprint changed by `fingerprint`: allocate
    refuses it with one error line (exit 3) and writes no plan. Returns (workdir, the line)."""
    from diffpro_cli.planning.fingerprint import machine_fingerprint

    other = dict(machine_fingerprint(), **fingerprint)
    work = tmp_path / "w"
    work.mkdir()
    (work / "cost_table.json").write_text(json.dumps(synthetic_cost_table(json.loads(scores_file.read_text()), fingerprint=other)))
    code, _, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=6", "--repeats", "1")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 3 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert not (work / "plan.json").exists()
    return work, lines[0]


def test_cost_table_from_another_machine_is_refused_unless_explicit(cli, scores_file, tmp_path):
    work, line = _refused_table_of(cli, scores_file, tmp_path, cpu="Some Other CPU 9000", isa_flags=["avx2"], kernel_vnni=False)
    assert "Some Other CPU 9000" in line and "--cost-table" in line
    code, out, err = cli("allocate", scores_file, "-w", work, "--budget", "avg-bits=6", "--repeats", "1",
                         "--cost-table", work / "cost_table.json")
    assert code == 0, err
    assert "warning:" in err and "Some Other CPU 9000" in err
    plan = json.loads((work / "plan.json").read_text())
    assert plan["cost_table"]["fingerprint"]["cpu"] == "Some Other CPU 9000"


def test_measured_cost_table_times_convs_as_convs_and_round_trips(tiny_model, tmp_path):
    from diffpro_cli.artifacts import atomic_write_json
    from diffpro_cli.planning.costs import measure_cost_table, read_cost_table, table_latency_fn

    opts = [Option(8, 8, "dynamic", None), Option(8, 16, "dynamic", None), Option(4, 16, "dynamic", None)]
    doc = measure_cost_table(tiny_model, opts, batch=2, repeats=1)
    conv = doc["layers"]["conv"]
    assert conv["kind"] == "Conv2d" and conv["input_shape"] == [2, 1, 8, 8]   # the real NCHW input, not an im2col GEMM
    assert set(conv["ms"]) == {"fp32", "w8a8d", "float-from-int"}              # one float column for every stored width
    assert all(v is None or v > 0 for row in doc["layers"].values() for v in row["ms"].values())
    assert doc["remainder_ms"] >= 0 and doc["fingerprint"]["threads"] >= 1
    path = tmp_path / "cost_table.json"
    atomic_write_json(path, doc)
    again = read_cost_table(path)
    layer = Layer("conv", "conv", "Conv2d", 9, 1, 10, 0, 1.0, 0.5, {})
    fn, fn2 = table_latency_fn(doc), table_latency_fn(again)
    for o in opts:
        assert fn(layer, o) == fn2(layer, o)
    assert fn(layer, Option(4, 16, "dynamic", None)) == fn(layer, Option(8, 16, "dynamic", None))


def _ctx(workdir):
    from diffpro_cli.stages.context import StageContext

    return StageContext.create("", workdir)


def test_cost_table_differing_only_outside_the_description_names_the_difference(cli, scores_file, tmp_path):
    """A table from the same CPU but another allocator setting was refused with 'measured on X; this is X':
    two identical machine descriptions and no hint of what to change."""
    _, line = _refused_table_of(cli, scores_file, tmp_path, allocator="some-other-allocator")
    assert "allocator 'some-other-allocator' there" in line and "; this is" not in line


def test_stage_with_injected_latency(scores_file, tmp_path):
    outcome, plan = run_allocate(_ctx(tmp_path / "w"), AllocateConfig(float_act=[], budget="latency-ms=0.3", protect=[]),
                                 scores_path=scores_file, latency_fn=fake_latency)
    assert outcome.status == "computed" and plan["totals"]["latency_ms"] <= 0.3
    assert plan["totals"]["latency_source"] == "injected"


def test_stage_joint_reads_workdir_timesteps(scores_file, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    sweep = [{"steps": k, "timesteps": list(range(0, 1000, 1000 // k)), "drift": 0.5 / k} for k in (5, 10)]
    (work / "timesteps.json").write_text(json.dumps({"schema": "diffpro.timesteps/1", "model": {"spec": "test:synthetic"},
                                                     "timesteps": sweep[1]["timesteps"], "sweep": sweep}))
    cfg = AllocateConfig(latency_budget=10.0, steps="auto", protect=[])
    outcome, plan = run_allocate(_ctx(work), cfg, scores_path=scores_file, latency_fn=fake_latency)
    assert plan["joint"]["steps"] in (5, 10) and plan["joint"]["total_latency_ms"] <= 10.0
    assert plan["timesteps"] == next(s["timesteps"] for s in sweep if s["steps"] == plan["joint"]["steps"])
    lock = json.loads((work / "diffpro.lock.json").read_text())
    assert "timesteps" in lock["stages"]["allocate"]["inputs"]
    with pytest.raises(UsageError, match="--latency-budget"):
        run_allocate(_ctx(work), AllocateConfig(budget="avg-bits=6", steps="auto"), scores_path=scores_file,
                     latency_fn=fake_latency)


@pytest.mark.parametrize("steps,needle", [("7", r"--steps 7: the timesteps artifact has step counts \[5, 10\]"),
                                          (0, r"--steps 0: must be at least 1")])
@pytest.mark.parametrize("budget", ["latency=0.5", "avg-bits=6,latency=0.5"])
def test_bad_steps_for_a_latency_fraction_fails_before_the_cost_table_is_timed(scores_file, tmp_path, monkeypatch, budget,
                                                                               steps, needle):
    """--budget latency=F --steps 7 against a sweep of 5 and 10 steps timed the whole cost table (minutes on a
    real model) before saying that 7 is not in the sweep. `steps = 0` (a TOML integer) was read as "auto"
    (`steps or "auto"`): the cost table was timed and the plan chose from the whole sweep, no error at all."""
    import diffpro_cli.stages.allocate as allocate_stage

    work = tmp_path / "w"
    work.mkdir()
    sweep = [{"steps": k, "timesteps": list(range(0, 1000, 1000 // k)), "drift": 0.5 / k} for k in (5, 10)]
    (work / "timesteps.json").write_text(json.dumps({"schema": "diffpro.timesteps/1", "model": {"spec": "test:synthetic"},
                                                     "timesteps": sweep[1]["timesteps"], "sweep": sweep}))

    def timed(*args, **kwargs):
        raise AssertionError("the cost table was timed before --steps was checked")

    monkeypatch.setattr(allocate_stage, "obtain_cost_table", timed)
    with pytest.raises(UsageError, match=needle):
        run_allocate(_ctx(work), AllocateConfig(budget=budget, steps=steps, protect=[]), scores_path=scores_file)
    assert not (work / "plan.json").exists() and not (work / "cost_table.json").exists()
