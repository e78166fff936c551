"""bench --fid end to end with a stand-in feature network (no Inception: seconds, not minutes): every
row carries fid_ci95 / kid / psnr_vs_fp32 ..., derived carries paired ΔFID intervals, the markdown
has the new columns and the significance line; versus_step_cut gains paired intervals."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffpro_cli.metrics import evidence
from diffpro_cli.stages.bench import BUILTIN_REFERENCE_NOTE, EVIDENCE_FIELDS, BenchConfig, measure_bench
from diffpro_cli.stages.comparisons import versus_step_cut
from diffpro_cli.stages.context import StageContext


class FakeInception(nn.Module):
    """[N, 3, H, W] in [0, 1] → [N, 2048]: 4 x 4 average pooling and a fixed random projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(48, 2048)
        torch.manual_seed(0)
        nn.init.normal_(self.proj.weight, std=0.3)

    def forward(self, x):
        return torch.relu(self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))


@pytest.fixture
def fake_inception(monkeypatch):
    from diffpro_cli.metrics import fid

    net = FakeInception().eval()
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": net)
    return net


def test_bench_fid_report_has_intervals_kid_paired_metrics_and_the_builtin_note(tmp_path, fake_inception):
    cfg = BenchConfig(rows=["fp32", "ddim", "dpmsolver"], reference_steps=6, steps=2, repeats=1, latency_batch=2,
                      fid=True, fid_n=12, memory=False, sample_batch=12)
    rep = measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    on_disk = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert on_disk["schema"] == "diffpro.report/1"
    ev = on_disk["fid"]["evidence"]
    assert ev["bootstrap"]["seed"] == cfg.seed and ev["bootstrap"]["resamples"] >= 200   # recorded, not implicit
    assert ev["kid"]["reference"]["subset_seed"] == 0 and ev["kid"]["reference"]["n"] == 500
    rows = {r["name"]: r for r in on_disk["rows"]}
    for r in rows.values():
        assert set(EVIDENCE_FIELDS) <= set(r)
        lo, hi = r["fid_ci95"]
        assert lo <= r["fid"] <= hi                   # an interval around the reported FID, not beside it
        assert r["kid"] is not None and r["kid_std"] >= 0
    fp, ddim = rows["fp32"], rows["ddim-2"]
    assert fp["psnr_vs_fp32"] is None and fp["fid_vs_fp_ci95"] is None     # the baseline against itself
    assert ddim["paired_n"] == 12 and ddim["psnr_vs_fp32"] > 5 and 0 < ddim["ssim_vs_fp32"] < 1
    assert ddim["psnr_vs_fp32_ci95"][0] <= ddim["psnr_vs_fp32"] <= ddim["psnr_vs_fp32_ci95"][1]
    d = on_disk["derived"]
    assert d["fp32"]["delta_fid_ci95"] is None and len(d["ddim-2"]["delta_fid_ci95"]) == 2
    assert BUILTIN_REFERENCE_NOTE in on_disk["notes"]
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "FID [95% CI]" in md and "KID ×10³" in md and "PSNR vs fp32" in md
    assert f"Significant at N = {cfg.fid_n}" in md and "ddim-2 vs fp32" in md
    assert "memorisation" in md
    # a second run reads features and paired images from the cache: the same numbers (nothing re-drawn)
    rep2 = measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    assert [r["psnr_vs_fp32"] for r in rep2["rows"]] == [r["psnr_vs_fp32"] for r in rep["rows"]]
    assert [r["fid_ci95"] for r in rep2["rows"]] == [r["fid_ci95"] for r in rep["rows"]]
    assert list((tmp_path / "bench" / "fid-cache").glob("paired-*.safetensors"))


def test_versus_step_cut_gains_paired_intervals_and_says_whether_the_difference_is_significant():
    rng = np.random.default_rng(0)
    n, d = 60, 8
    fp = np.abs(rng.normal(size=(n, d)))
    feats = {"fp32": fp, "ddim-25": fp + 0.02 * rng.normal(size=(n, d)), "diffpro": fp + 0.5}
    mu, sigma = fp.mean(0), np.cov(fp, rowvar=False)
    results, reps = evidence.measure_rows(feats, {}, mu, sigma, None, seed=0, resamples=200)

    def row(name, steps, med):
        return {"name": name, "steps": steps, "latency_s_per_image": {"median": med},
                "fid": results[name]["fid"], "fid_vs_fp": results[name]["fid_vs_fp"]}

    report = {"rows": [row("fp32", 50, 2.0), row("ddim-25", 25, 1.0), row("diffpro", 25, 0.5)],
              "derived": {"diffpro": {"compression": 4.0}}}
    (entry,) = versus_step_cut(report, reps)
    lo, hi = entry["delta_fid_vs_fp_ci95"]
    assert lo > 0 and lo <= entry["delta_fid_vs_fp"] <= hi        # diffpro is really further from fp32
    assert entry["delta_fid_ci95"] is not None and "significant" in entry["line"]
    assert "FID vs fp32" in entry["line"] and "not significant" not in entry["line"]
    assert "delta_fid_vs_fp_ci95" not in versus_step_cut(report)[0]   # without replicates: as before
