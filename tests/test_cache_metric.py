"""allocate's keep-cache measure (`cache_metric`, docs/caching.md): the distance plan_joint_cache
decides with is the one the stage passes in (paired Inception features of decoded samples by default,
MSE as before), with a recorded fallback to MSE when the Inception weights are missing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffpro_cli.errors import InputError


def _mse(a, b) -> float:
    return float(((a - b) ** 2).mean())


def _tiny_model(build, decode=None):
    from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod

    net = build()
    with torch.no_grad():
        for p in net.parameters():          # DiT zero-inits its output layers: every schedule would agree
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    extra = {} if decode is None else {"decode": decode}
    return DiffusionModel(spec="tiny", net=net, kind="dit", sample_shape=(4, 8, 8), alphas_cumprod=linear_alphas_cumprod(),
                          forward_fn=dit_forward, num_classes=10, **extra)


def test_plan_joint_cache_decides_with_the_injected_distance_on_decoded_samples(tiny_dit):
    """A distance that ranks the schedules opposite to MSE (1 / MSE): the kept row is the one that
    distance prefers, not MSE's, and every recorded drift is that distance of the same samples. With
    decode the distance sees decoded samples (this model's decode adds 7), without it model space."""
    from diffpro_cli.planning.cache_plan import CachePlanConfig, plan_joint_cache
    from diffpro_cli.sampling import uniform_timesteps

    model = _tiny_model(tiny_dit, decode=lambda x: x + 7.0)
    base_ts, cands = uniform_timesteps(1000, 6), {9: uniform_timesteps(1000, 9)}
    ccfg = CachePlanConfig(n=2, batch=2, repeats=1, proposals=("aligned", "interval"), step_cut=False)
    args = (model, model, base_ts, cands, 1.0, [0.3, 0.3], 6.0, uniform_timesteps(1000, 12), ccfg)
    by_mse = plan_joint_cache(*args)
    seen = []

    def inverse(a, b):
        seen.append((float(a.mean()), b))
        return 1.0 / (1e-12 + _mse(a, b))

    inv = plan_joint_cache(*args, distance=inverse, decode=True)
    drifts = [by_mse["base"]["drift"]] + [r["drift"] for r in by_mse["candidates"] if r["drift"] is not None]
    assert len(drifts) >= 2 and len(set(drifts)) == len(drifts)      # the situation has a choice to make
    # same samples (seeded), other measure: every drift is 1 / its MSE (decoding adds 7 to both sides)
    assert inv["base"]["drift"] == pytest.approx(1 / by_mse["base"]["drift"], rel=1e-4)
    for a, b in zip(by_mse["candidates"], inv["candidates"]):
        assert (a["drift"] is None) == (b["drift"] is None)
        if a["drift"] is not None:
            assert b["drift"] == pytest.approx(1 / a["drift"], rel=1e-4)
    # MSE keeps its least-MSE row, the injected distance its least-distance (= largest-MSE) row
    assert by_mse["chosen"]["drift"] == min(drifts)
    assert inv["chosen"]["drift"] == pytest.approx(1 / max(drifts), rel=1e-4)
    assert (inv["chosen"]["steps"], inv["chosen"]["cache"]) != (by_mse["chosen"]["steps"], by_mse["chosen"]["cache"])
    assert all(abs(mean - 7) < 2 for mean, _ in seen)                 # decoded samples, not model space
    assert all(b is seen[0][1] for _, b in seen)                      # one teacher tensor for every call


def test_paired_feature_distance_by_hand_and_teacher_features_computed_once():
    from diffpro_cli.metrics.feature_distance import PairedFeatureDistance

    calls = []
    dist = PairedFeatureDistance(lambda x: calls.append(len(x)) or x.flatten(1).numpy())
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    # per sample ‖Δf‖²: 4 and 0; mean 2, over 2 features: 1
    assert dist(torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1), teacher) == pytest.approx(1.0)
    assert dist(teacher.clone(), teacher) == 0.0
    assert calls == [2, 2, 2]                          # teacher once, then one pass per candidate
    with pytest.raises(ValueError):
        dist(teacher[:1], teacher)


class FakeInception(nn.Module):
    """Stands in for the FID network: [N, 3, H, W] in [0, 1] → 2048 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 2048)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))


def _cache_section(tmp_path, metric: str, capsys, monkeypatch):
    from diffpro_cli.cache import num_cache_units
    from diffpro_cli.console import UI
    from diffpro_cli.planning import cache_plan
    from diffpro_cli.stages.allocate import AllocateConfig
    from diffpro_cli.stages.allocate_cache import joint_cache_section
    from diffpro_cli.stages.context import StageContext
    from diffpro_cli.stages.quantize import uniform_plan

    ctx = StageContext.create("random:dit-tiny", tmp_path, ui=UI())
    ctx.model().decode = lambda z: torch.tanh(z[:, :3])      # a stand-in decoder to 3-channel images in [-1, 1]
    n_units = num_cache_units(ctx.model().net)
    # the cached blocks take 90% of the forward (not timed: the candidates measured must not depend on this CPU)
    monkeypatch.setattr(cache_plan, "block_latencies", lambda model, cfg, with_forward=False: ([0.9 / n_units] * n_units, 1.0))
    plan = uniform_plan(ctx.model(), 8)
    for entry in plan["layers"].values():
        entry["latency_ms"] = 0.02                   # as fast as fp32: the blocks keep their share of the step
    plan["totals"] = {"latency_ms": 0.02 * len(plan["layers"])}
    plan["timesteps"] = [0, 250, 500, 750]
    doc = {"layers": {n: {"ms": {"fp32": 0.02}} for n in plan["layers"]}}
    capsys.readouterr()
    sec = joint_cache_section(ctx, AllocateConfig(budget="avg-bits=8", cache_n=2, full_steps=8, batch=2,
                                                  cache_objective="drift", cache_metric=metric), plan, doc, None)
    return sec, capsys.readouterr().err


def test_allocate_inception_without_weights_falls_back_to_mse_and_records_it(tmp_path, monkeypatch, capsys):
    from diffpro_cli.metrics import fid

    def missing(weights=None, device="cpu"):
        raise InputError("no FID Inception weights found; pass --inception-weights PATH")

    monkeypatch.setattr(fid, "load_inception", missing)
    sec, err = _cache_section(tmp_path, "inception", capsys, monkeypatch)
    assert sec["metric"] == "mse" and sec["drift_definition"].startswith("MSE")
    notes = [line for line in err.splitlines() if "using mse" in line]
    assert len(notes) == 1 and "Inception weights" in notes[0]
    measured = [c for c in sec["candidates"] if c["drift"] is not None]
    assert sec["drift"] == min([sec["base"]["drift"]] + [c["drift"] for c in measured])


def test_allocate_inception_records_the_feature_distance_with_one_teacher_pass(tmp_path, monkeypatch, capsys):
    from diffpro_cli.metrics import fid

    net = FakeInception().eval()
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": net)
    sec, err = _cache_section(tmp_path, "inception", capsys, monkeypatch)
    assert sec["metric"] == "inception" and "Inception" in sec["drift_definition"] and "using mse" not in err
    measured = [c for c in sec["candidates"] if c["drift"] is not None]
    assert measured and net.calls == 2 + len(measured)   # teacher once, the plan once, each measured schedule once


def test_cli_bad_cache_metric_one_error_line_nothing_written(cli, tmp_path):
    from test_allocate import make_scores

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(make_scores(n=8, seed=7)))
    work = tmp_path / "w"
    code, _out, err = cli("allocate", scores, "-w", work, "--budget", "avg-bits=5", "--cache", "--cache-metric", "bogus",
                          "--latency-source", "analytic", "--remainder-ms", "0", "--repeats", "1")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--cache-metric bogus" in lines[0] and "inception" in lines[0]
    assert not work.exists() or not any(p.is_file() for p in work.rglob("*"))
