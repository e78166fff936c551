"""`diffpro run`: the whole pipeline from one config, resumable after a kill at any point."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffpro_cli.stages.run import STAGES

CONFIG = """\
model = "random:dit-tiny"
workdir = "{workdir}"
seed = 3

[profile]
samples = 4
timesteps = "999:0:250"
batch = 4

[score]
figures = false

[prune]
steps = 6
reference_steps = 24
n = 4
batch = 4

[allocate]
budget = "avg-bits=6"
latency_source = "analytic"
repeats = 1

[quantize]
act_mode = "dynamic"

[bench]
rows = ["fp32", "w8a8-uniform", "ddim", "diffpro"]
reference_steps = 12
repeats = 1
latency_batch = 2
grid_n = 2
"""


def _write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.format(workdir=tmp_path / "work"))
    return cfg


def _run(cfg: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffpro_cli", "run", str(cfg), "--json", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _locked_stages(workdir: Path) -> set[str]:
    try:
        return set(json.loads((workdir / "diffpro.lock.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def _statuses(stdout: str) -> dict[str, str]:
    result = json.loads(stdout)
    return {o["stage"]: o["status"] for o in result["stages"]}


def test_run_end_to_end_then_everything_up_to_date(tmp_path):
    cfg = _write_config(tmp_path)
    proc = _run(cfg)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert set(_statuses(out).values()) == {"computed"}
    work = tmp_path / "work"
    report = json.loads((work / "bench" / "report.json").read_text())
    assert report["schema"] == "diffpro.report/1"
    assert [r["name"] for r in report["rows"]] == ["fp32", "w8a8-uniform", "ddim-6", "diffpro"]
    assert report["model"]["random_weights"] is True
    diffpro_row = report["rows"][-1]
    assert diffpro_row["steps"] == 6 and diffpro_row["weight_bits_avg"] <= 6.0 + 1e-6
    assert any(k.startswith("cpu-") for k in diffpro_row["kernels"])   # real integer kernels ran
    for row in report["rows"]:   # measured in fresh processes: never the in-process ~0 of a reused heap
        assert 0 < row["load_mem_bytes"] <= row["peak_mem_bytes"], row
    fp32_row, ddim_row = report["rows"][0], report["rows"][2]
    assert ddim_row["peak_mem_bytes"] == fp32_row["peak_mem_bytes"]   # same model, same measurement

    again = _run(cfg)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert _statuses(out) == {s: "up to date" for s in STAGES}


def test_run_killed_mid_pipeline_resumes_without_redoing_finished_stages(tmp_path):
    cfg = _write_config(tmp_path)
    work = tmp_path / "work"
    proc = _run(cfg)
    deadline = time.time() + 300
    # kill -9 as soon as the first two stages are recorded: a later stage is then in progress
    while time.time() < deadline and not {"profile", "score"} <= _locked_stages(work):
        if proc.poll() is not None:
            pytest.fail(f"run finished before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = _locked_stages(work)
    assert {"profile", "score"} <= finished_before and "bench" not in finished_before
    lock_before = json.loads((work / "diffpro.lock.json").read_text())["stages"]
    assert json.loads((work / "scores.json").read_text())   # finished artifacts are whole

    resumed = _run(cfg)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    statuses = _statuses(out)
    for stage in finished_before:
        assert statuses[stage] == "up to date", (stage, statuses)
    assert statuses["bench"] == "computed"
    lock_after = json.loads((work / "diffpro.lock.json").read_text())["stages"]
    for stage in finished_before:   # their records (and so their outputs) were not rewritten
        assert lock_after[stage] == lock_before[stage]
    assert (work / "bench" / "report.json").exists() and (work / "bench" / "report.md").exists()
    assert not list(work.rglob("*.tmp")), "a temporary file was left behind"


def test_unknown_key_in_a_later_section_fails_before_any_stage_runs(tmp_path, cli):
    cfg = _write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("grid_n = 2", "grid_n = 2\nrowz = 1"))
    code, out, err = cli("run", cfg)
    assert code == 2 and "[bench] unknown key(s) rowz" in err and "Traceback" not in err
    assert not (tmp_path / "work" / "diffpro.lock.json").exists()   # nothing was computed


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace('[quantize]\nact_mode = "dynamic"', '[quantize]\nact_mode = "static"'), "[quantize] act_mode = 'static'"),
    (lambda t: t.replace('[quantize]\n', '[quantize]\ngroup_size = 16\n'), "[quantize] group_size = 16"),
])
def test_quantize_options_a_plan_refuses_fail_before_any_stage_runs(tmp_path, cli, edit, needle):
    """quantize --plan refuses an act_mode other than the plan's and any act_bits/group_size; in a run config
    that refusal came at the quantize stage, after profile, score, prune and allocate had run (minutes)."""
    cfg = _write_config(tmp_path)
    text = edit(cfg.read_text())
    assert text != cfg.read_text()
    cfg.write_text(text)
    code, out, err = cli("run", cfg)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "work" / "diffpro.lock.json").exists()   # nothing was computed


FACTORY_MODULE = '''\
import torch
from torch import nn


class TinyUNet(nn.Module):
    """A small third-party style noise predictor: convs, a time MLP and a class embedding."""

    sample_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(1, 16, 3, padding=1)
        self.temb = nn.Linear(1, 16)
        self.cemb = nn.Embedding(11, 16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t, y):
        h = self.inp(x) + self.temb(t.float().view(-1, 1) / 1000).view(-1, 16, 1, 1)
        if y is not None:
            h = h + self.cemb(y).view(-1, 16, 1, 1)
        return self.out(torch.tanh(self.mid(torch.tanh(h))))


def factory():
    return TinyUNet()
'''

FACTORY_CONFIG = """\
model = "{module}:factory"
workdir = "{workdir}"
seed = 1
trust_code = true

[profile]
samples = 4
timesteps = "999:0:250"
batch = 4

[score]
figures = false

[prune]
steps = 4
reference_steps = 16
n = 4
batch = 4

[allocate]
budget = "avg-bits=8"
latency_source = "analytic"
repeats = 1
pareto = true

[bench]
rows = ["fp32", "w8a8-uniform", "ddim", "diffpro"]
reference_steps = 8
repeats = 1
latency_batch = 2
grid_n = 2
"""


def test_module_factory_model_runs_every_stage_with_trust_code_from_the_config(tmp_path):
    """#18: trust_code must reach bench's reloads of quantized checkpoints, their fresh-process memory
    measurement and allocate's timing of the model (it used to fail in bench / time 0 ms)."""
    pkg = tmp_path / "thirdparty"
    pkg.mkdir()
    (pkg / "tiny_factory_unet.py").write_text(FACTORY_MODULE)
    cfg = tmp_path / "run.toml"
    cfg.write_text(FACTORY_CONFIG.format(module="tiny_factory_unet", workdir=tmp_path / "work"))
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "diffpro_cli", "run", str(cfg), "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert set(_statuses(proc.stdout).values()) == {"computed"}
    work = tmp_path / "work"
    plan = json.loads((work / "plan.json").read_text())
    assert plan["totals"]["remainder_source"] == "measured"        # allocate loaded the factory model
    report = json.loads((work / "bench" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "w8a8-uniform", "ddim-4", "diffpro"}
    md = (work / "bench" / "report.md").read_text()   # the plan's Pareto front reaches the report
    assert "](figures/pareto.png)" in md and (work / "bench" / "figures" / "pareto.png").stat().st_size > 1000
    for name in ("w8a8-uniform", "diffpro"):   # quantized checkpoints of the factory network, reloaded
        assert rows[name]["load_mem_bytes"] and rows[name]["load_mem_bytes"] > 0, rows[name]
        assert any(k.startswith("cpu-") for k in rows[name]["kernels"]), rows[name]["kernels"]


def test_untrusted_module_factory_run_stops_before_any_stage(tmp_path):
    pkg = tmp_path / "thirdparty"
    pkg.mkdir()
    (pkg / "tiny_factory_unet2.py").write_text(FACTORY_MODULE)
    cfg = tmp_path / "run.toml"
    cfg.write_text(FACTORY_CONFIG.format(module="tiny_factory_unet2", workdir=tmp_path / "work").replace("trust_code = true\n", ""))
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(pkg)}
    proc = subprocess.run([sys.executable, "-m", "diffpro_cli", "run", str(cfg), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 5 and proc.stderr.startswith("error:") and "--trust-code" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "diffpro.lock.json").exists()


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "sample_configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_sample_config_names_only_known_keys(config):
    """A typo in a shipped config would fail a user's run only when it reaches that stage."""
    from diffpro_cli.stages.run import check_sections, load_run_config

    check_sections(load_run_config(config))


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "sample_configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_sample_config_quantizes_with_the_activation_mode_it_plans(config):
    """quantize --plan refuses an act_mode other than the plan's: a shipped config whose [quantize]
    act_mode differs from [allocate]'s (default dynamic), or that sets act_bits / group_size beside a plan,
    would fail at its quantize stage (the test checked act_mode only)."""
    from diffpro_cli.stages.run import load_run_config

    sections = load_run_config(config).sections
    planned = sections.get("allocate", {}).get("act_mode", "dynamic")
    quantize = sections.get("quantize", {})
    assert quantize.get("act_mode", planned) == planned
    if quantize.get("bits") is None:   # --plan also refuses act_bits and group_size (they are allocate's)
        assert not {"act_bits", "group_size"} & set(quantize), quantize


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("steps = 6\n", "steps = 1\n"), "[prune] --steps 1: must be between 2"),
    (lambda t: t.replace("steps = 6\n", "steps = 6\nprotect_tail = 9\n"), "[prune] --protect-tail 9"),
    (lambda t: t.replace("steps = 6\n", "steps = 6\nfraction = 0.5\n"), "[prune] --steps and --fraction both given"),
    (lambda t: t.replace('budget = "avg-bits=6"', 'budget = "avg-bits=6"\nmethod = "greedy"'), "[allocate] --method greedy"),
])
def test_out_of_range_option_of_a_later_stage_fails_before_any_stage_runs(tmp_path, cli, edit, needle):
    """[prune] steps = 1 (or a bad [allocate] method) was refused only when that stage's turn came, after
    profile and score had run: minutes on a real model, for a typo the config already showed."""
    cfg = _write_config(tmp_path)
    text = edit(cfg.read_text())
    assert text != cfg.read_text()
    cfg.write_text(text)
    code, _, err = cli("run", cfg, "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "work" / "diffpro.lock.json").exists()   # nothing was computed


def test_typo_in_the_section_of_a_stage_not_run_is_still_named(tmp_path, cli):
    """With stages = ["profile"] (or --stages profile), `[bench] rowz = 1` passed silently and failed only on
    the run that included bench."""
    cfg = _write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("grid_n = 2", "grid_n = 2\nrowz = 1"))
    code, _, err = cli("run", cfg, "--stages", "profile", "--quiet")
    assert code == 2 and "[bench] unknown key(s) rowz" in err
    assert not (tmp_path / "work" / "diffpro.lock.json").exists()


def test_a_run_of_no_stages_is_a_usage_error(tmp_path, cli):
    """stages = [] (or --stages ,) ran nothing, printed 'done:' and exited 0."""
    cfg = _write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("seed = 3\n", "seed = 3\nstages = []\n"))
    code, _, err = cli("run", cfg, "--quiet")
    assert code == 2 and "stages = [] runs nothing" in err
    cfg = _write_config(tmp_path)
    code, _, err = cli("run", cfg, "--stages", ",", "--quiet")
    assert code == 2 and "names no stage" in err


def test_relative_path_beside_the_config_but_not_in_the_current_directory_is_named(tmp_path, cli, monkeypatch):
    """prompts = "digits.txt" beside run.toml, run from another directory: the error was the prompts reader's
    bare 'digits.txt: no such prompts file', not saying that config paths are relative to the current directory."""
    here = tmp_path / "configs"
    here.mkdir()
    (here / "digits.txt").write_text("the digit 3\n")
    (here / "run.toml").write_text('model = "builtin:flow-mnist"\nworkdir = "work"\nprompts = "digits.txt"\nstages = ["profile"]\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", here / "run.toml", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 3 and len(lines) == 1 and "is read relative to the current directory" in lines[0], err
    assert str(here / "digits.txt") in lines[0]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("section,key,value,needle", [
    ("quantize", "rounding", '"best"', "[quantize] --rounding best"),
    ("quantize", "calib_steps", "0", "[quantize] calib_steps 0"),
    ("quantize", "bits", "5", "[quantize] --bits 5"),
    ("bench", "repeats", "0", "[bench] --repeats"),
    ("bench", "cfg_scale", "nan", "[bench] --cfg nan"),
    ("bench", "grid_n", "0", "[bench] sample_batch 50 / grid_n 0")])
def test_a_bad_quantize_or_bench_value_fails_before_the_first_stage(cli, tmp_path, section, key, value, needle):
    """[quantize] rounding = "best" failed only at quantize's turn, after profile, score, prune and allocate
    had run (minutes on a real model), and [bench] repeats = 0 ended in 'StatisticsError: no median for
    empty data' after every other stage: their checks were inline in the stage or the CLI command, not in
    a validate_config that run calls first."""
    config = tmp_path / "c.toml"
    config.write_text(f'model = "random:dit-tiny"\nworkdir = "{tmp_path / "w"}"\n[allocate]\nbudget = "avg-bits=6"\n'
                      f"[{section}]\n{key} = {value}\n")
    code, _, err = cli("run", config)
    assert code == 2 and needle in err and err.count("error:") == 1, err
    assert not (tmp_path / "w").exists()


def test_the_api_bench_checks_its_options_before_loading(tmp_path):
    # catches: diffpro.bench(repeats=0) reaching the timing loop (the checks were in the CLI command only)
    import diffpro
    from diffpro_cli.errors import UsageError

    with pytest.raises(UsageError, match="--repeats"):
        diffpro.bench("random:dit-tiny", tmp_path / "w", repeats=0)
