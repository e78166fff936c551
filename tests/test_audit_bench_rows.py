"""bench --rows selections a user can type: a row named twice, and rows that all need an input that is
absent (every requested row skipped)."""

import json

from diffpro_cli.stages.bench import BenchConfig, measure_bench
from diffpro_cli.stages.context import StageContext


def test_a_row_named_twice_is_measured_and_reported_once(tmp_path):
    """Catches: --rows fp32,ddim,fp32 reporting fp32 twice (two table lines, two identical entries in
    report.json's rows, one of them never timed on its own: timings are keyed by name)."""
    cfg = BenchConfig(rows=["fp32", "ddim", "fp32"], reference_steps=2, steps=1, repeats=1, latency_batch=1,
                      memory=False)
    measure_bench(StageContext.create("random:dit-tiny", tmp_path), cfg)
    on_disk = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert [r["name"] for r in on_disk["rows"]] == ["fp32", "ddim-1"]
    md = (tmp_path / "bench" / "report.md").read_text()
    assert md.count("| fp32 |") == 1


def test_rows_that_all_need_an_absent_input_say_which_input(cli, tmp_path):
    """Catches: `--rows diffpro` without a checkpoint answered "--rows selects nothing to measure; name
    at least one row" to a user who named one; the error now says the row was skipped and how to fix it."""
    rc, _, err = cli("bench", "random:dit-tiny", "--rows", "diffpro,subset", "--repeats", 1, "--latency-batch", 1,
                     "--reference-steps", 2, "-w", tmp_path / "w")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("bench:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "no quantized checkpoint" in lines[0] and "diffpro quantize" in lines[0] and "no timesteps" in lines[0]
    assert not (tmp_path / "w" / "bench" / "report.json").exists()


def test_a_reference_step_count_beyond_the_model_names_reference_steps(cli, tmp_path):
    """Catches: `--reference-steps 5000` answered "error: --steps 5000: must be between 1 and 1000",
    naming an option the user did not pass (and --steps checked only when a ddim row was built)."""
    for option in ("--reference-steps", "--steps"):
        rc, _, err = cli("bench", "random:dit-tiny", "--rows", "fp32", option, 5000, "--repeats", 1,
                         "--latency-batch", 1, "-w", tmp_path / option.strip("-"))
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("bench:")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {option} 5000: must be between 1 and 1000"), err


def test_the_nocache_row_without_a_checkpoint_says_there_is_no_checkpoint(cli, tmp_path):
    """Catches: `--rows diffpro-nocache` without a checkpoint said "the checkpoint has no cache section",
    sending the user to re-plan a cache for a checkpoint that does not exist."""
    rc, _, err = cli("bench", "random:dit-tiny", "--rows", "diffpro-nocache", "--repeats", 1, "--latency-batch", 1,
                     "--reference-steps", 2, "-w", tmp_path / "w")
    assert rc == 2 and "diffpro-nocache row skipped: no quantized checkpoint" in err and "cache section" not in err, err
