"""bench --fid with a tiny --fid-n: no 95 % intervals (null / n/a) and no "significant" verdicts, said once
in report.md; from MIN_INTERVAL_N on the intervals are back."""

import json

import numpy as np
import torch

from diffpro_cli.metrics import evidence
from diffpro_cli.metrics import stats as S


def _features(n, seed=0):
    rng = np.random.default_rng(seed)
    fp = np.abs(rng.normal(size=(n, 2048)))
    return {"fp32": fp, "ddim-2": fp + 0.1 * rng.normal(size=(n, 2048))}


def _images(n):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8) for k in ("fp32", "ddim-2")}


def test_no_interval_and_no_paired_ci_below_the_minimum_n():
    """Catches: --fid-n 2 reported "95 %" intervals (a 2-sample bootstrap covers the truth in ~50 % of
    draws) and called ΔFID "significant" from them."""
    mu, sigma = np.ones(2048), np.eye(2048)
    res, reps = evidence.measure_rows(_features(2), _images(2), mu, sigma, None, seed=0)
    ddim = res["ddim-2"]
    assert ddim["fid"] is not None and ddim["fid_vs_fp"] is not None and ddim["psnr_vs_fp32"] is not None
    assert ddim["fid_ci95"] is None and ddim["fid_vs_fp_ci95"] is None and ddim["psnr_vs_fp32_ci95"] is None
    assert ddim["ssim_vs_fp32_ci95"] is None and reps.paired_ci("ddim-2", "fp32", "fid") is None
    n = S.MIN_INTERVAL_N
    res, reps = evidence.measure_rows(_features(n), _images(n), mu, sigma, None, seed=0)
    assert res["ddim-2"]["fid_ci95"] is not None and res["ddim-2"]["psnr_vs_fp32_ci95"] is not None
    assert reps.paired_ci("ddim-2", "fp32", "fid") is not None




def test_report_says_why_a_tiny_fid_n_has_no_intervals(tmp_path, stand_in_inception):
    from diffpro_cli.stages.bench import BenchConfig, measure_bench
    from diffpro_cli.stages.context import StageContext

    cfg = BenchConfig(rows=["fp32", "ddim"], reference_steps=2, steps=1, repeats=1, latency_batch=1, fid=True,
                      fid_n=3, memory=False, sample_batch=3)
    measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    rep = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert all(r["fid_ci95"] is None for r in rep["rows"]) and rep["derived"]["ddim-1"]["delta_fid_ci95"] is None
    assert rep["fid"]["evidence"]["bootstrap"]["min_n"] == S.MIN_INTERVAL_N
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "Significant at N" not in md and "No 95 % intervals and no significance at N = 3" in md
    assert "[" not in next(line for line in md.splitlines() if line.startswith("| ddim-1 |"))   # no interval shown
