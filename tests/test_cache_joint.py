"""bits × steps × cache (planning/joint.py, cache_plan.plan_joint_cache): more steps with reused
computation against the plan's own steps, at the same predicted latency."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffpro_cli.planning.cache_plan import interval_schedule
from diffpro_cli.planning.joint import (cache_fraction_for, schedule_latency_ms, select_fastest_cache,
                                        select_joint_cache, unit_latencies_under_plan)


def test_unit_latency_under_plan_swaps_each_layers_fp32_time_for_the_chosen_one():
    plan = {"a": {"latency_ms": 0.5}, "b": {"latency_ms": 2.0}, "c": {"latency_ms": 1.0}}
    fp = {"a": 1.0, "b": 2.5, "c": 4.0}
    # unit 0 holds a and b (-0.5, -0.5), unit 1 holds c (-3.0); d is not planned
    assert unit_latencies_under_plan([5.0, 6.0], [["a", "b"], ["c", "d"]], plan, fp) == [4.0, 3.0]


def test_schedule_latency_and_the_fraction_that_fills_the_budget():
    step, units = 10.0, [3.0, 3.0, 2.0]          # 2 ms outside the units
    assert schedule_latency_ms(step, units, [{0, 1, 2}, {2}, set()]) == 10 + 4 + 2
    f = cache_fraction_for(step, units, 15, 100.0)
    assert f == pytest.approx((100 - 15 * 2) / (15 * 8))
    # a schedule computing exactly that share of the unit time costs exactly the budget
    assert 15 * (step - 8) + f * 15 * 8 == pytest.approx(100.0)
    assert cache_fraction_for(step, units, 60, 100.0) < 0   # 60 steps cannot fit even with every unit reused


def test_selection_is_the_brute_force_optimum_within_budget():
    """A hand-made cost/drift table: K' steps, every unit recomputed every k-th step; drift falls with
    steps and grows with each reused step. The known optimum (brute force here, with the latency
    summed step by step) is what the planner keeps, and it is within the budget."""
    step, units, K, budget = 10.0, [3.0, 3.0, 2.0], 10, 100.0
    base = {"steps": K, "drift": 1.0 / K, "predicted_ms": K * step, "cache": None}

    def drift(k2, computed):
        return 1.0 / k2 + 0.004 * sum(1 for s in computed if not s)

    cands = []
    for k2, k in itertools.product((12, 15, 20, 30), (1, 2, 3, 4)):
        computed = interval_schedule(k2, 3, k, 1)
        cands.append({"steps": k2, "interval": k, "cache": computed, "drift": drift(k2, computed),
                      "predicted_ms": schedule_latency_ms(step, units, computed)})
    fits = [c for c in cands if sum(step - sum(units[u] for u in range(3) if u not in s) for s in c["cache"]) <= budget]
    best = min(fits, key=lambda c: c["drift"])
    assert best["drift"] < base["drift"] and any(c["drift"] < best["drift"] for c in cands)   # a cheaper-drift one is over budget
    chosen = select_joint_cache(base, cands, budget)
    assert chosen is best and chosen["predicted_ms"] <= budget
    # when nothing cached drifts less, the plan keeps its own steps without a cache
    assert select_joint_cache({**base, "drift": 0.0}, cands, budget)["cache"] is None


def test_latency_objective_keeps_the_fastest_schedule_that_drifts_no_more_brute_force():
    """Same hand-made table, objective latency: among every cached candidate the known optimum (brute
    force) is the fastest whose drift is within the plan's; a faster one that drifts more is refused."""
    step, units, K = 10.0, [3.0, 3.0, 2.0], 10
    base = {"steps": K, "drift": 1.0 / K, "predicted_ms": K * step, "cache": None}
    cands = []
    for k2, k in itertools.product((10, 12, 15, 20), (2, 3, 4)):
        computed = interval_schedule(k2, 3, k, 1)
        cands.append({"steps": k2, "cache": computed, "drift": 1.0 / k2 + 0.004 * sum(1 for s in computed if not s),
                      "predicted_ms": schedule_latency_ms(step, units, computed)})
    ok = [c for c in cands if c["drift"] <= base["drift"] and c["predicted_ms"] < base["predicted_ms"]]
    best = min(ok, key=lambda c: c["predicted_ms"])
    assert any(c["predicted_ms"] < best["predicted_ms"] and c["drift"] > base["drift"] for c in cands)
    chosen = select_fastest_cache(base, cands)
    assert chosen is best and chosen["drift"] <= base["drift"] and chosen["predicted_ms"] < base["predicted_ms"]
    # a tolerance admits the faster one that drifts a little more; none within the drift: no cache
    loose = select_fastest_cache(base, cands, tolerance=0.5)
    assert loose["predicted_ms"] < best["predicted_ms"] and loose["drift"] <= 1.5 * base["drift"]
    assert select_fastest_cache({**base, "drift": 0.0}, cands) is not None
    assert select_fastest_cache({**base, "drift": 0.0}, cands)["cache"] is None


def test_plan_joint_cache_on_a_tiny_dit_measures_against_the_float_teacher():
    from diffusers import DiTTransformer2DModel

    from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod
    from diffpro_cli.planning.cache_plan import CachePlanConfig, plan_joint_cache
    from diffpro_cli.sampling import uniform_timesteps

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    model = DiffusionModel(spec="tiny", net=net, kind="dit", sample_shape=(4, 8, 8),
                           alphas_cumprod=linear_alphas_cumprod(), forward_fn=dit_forward, num_classes=10)
    base_ts = uniform_timesteps(1000, 6)
    cands = {9: uniform_timesteps(1000, 9), 12: uniform_timesteps(1000, 12), 40: uniform_timesteps(1000, 40)}
    step, units = 1.0, [0.3, 0.3, 0.3]
    ccfg = CachePlanConfig(n=2, batch=2, repeats=1, proposals=("aligned", "interval"), step_cut=False)
    rec = plan_joint_cache(model, model, base_ts, cands, step, units, 6 * step, uniform_timesteps(1000, 20), ccfg)
    rows = {r["steps"]: r for r in rec["candidates"]}
    assert "skipped" in rows[40]                                  # 40 × 0.1 ms outside the units alone is over 6 ms
    measured = [r for r in rec["candidates"] if r["drift"] is not None]
    assert measured and all(r["predicted_ms"] <= 6 * step + 1e-9 for r in measured)
    assert rec["chosen"]["drift"] == min([rec["base"]["drift"]] + [r["drift"] for r in measured])
    # objective latency: the plan's own 6 steps are tried with a cache too, at falling targets; what is
    # kept is faster than the plan and drifts no more, or is the plan itself
    fast = plan_joint_cache(model, model, base_ts, cands, step, units, 6 * step, uniform_timesteps(1000, 20), ccfg,
                            objective="latency")
    tried = [r for r in fast["candidates"] if r["drift"] is not None]
    assert any(r["steps"] == 6 for r in tried) and all(r["predicted_ms"] < 6 * step for r in tried)
    ch = fast["chosen"]
    assert ch is fast["base"] or (ch["drift"] <= fast["base"]["drift"] and ch["predicted_ms"] < 6 * step)
    with pytest.raises(Exception, match="objective"):
        plan_joint_cache(model, model, base_ts, cands, step, units, 6 * step, [0], ccfg, objective="speed")


def test_allocate_cache_section_feeds_quantize(tmp_path):
    """The allocate step's wiring on a real (tiny, random) DiT: plan + cost table in, a `cache`
    section out whose enabled schedule fixes the checkpoint's timesteps."""
    from diffpro_cli.stages.allocate import AllocateConfig
    from diffpro_cli.stages.allocate_cache import joint_cache_section
    from diffpro_cli.stages.context import StageContext
    from diffpro_cli.stages.quantize import cache_timesteps, uniform_plan

    ctx = StageContext.create("random:dit-tiny", tmp_path)
    model = ctx.model()
    plan = uniform_plan(model, 8)
    for entry in plan["layers"].values():
        entry["latency_ms"] = 0.01
    plan["totals"] = {"latency_ms": 1.0}
    plan["timesteps"] = [0, 250, 500, 750]
    doc = {"layers": {n: {"ms": {"fp32": 0.02}} for n in plan["layers"]}}
    sec = joint_cache_section(ctx, AllocateConfig(budget="avg-bits=8", cache_n=2, full_steps=8, batch=2, cache_objective="drift"),
                              plan, doc, None)
    assert sec["schema"] == "diffpro.cache/1" and sec["base_timesteps"] == plan["timesteps"]
    # units priced from one timing session with the whole forward: together less than the step
    assert 0 < sum(sec["unit_share_of_fp32_step"]) < 1
    assert sorted(c["steps"] for c in sec["candidates"]) == [5, 6, 8]
    assert all(c["predicted_ms"] <= sec["budget_ms"] * (1 + 1e-9) for c in sec["candidates"] if c["drift"] is not None)
    assert sec["enabled"] == (sec["schedule"] is not None) == (sec["drift"] < sec["base"]["drift"])
    plan["cache"] = sec
    ts = cache_timesteps(plan, plan["timesteps"], model)
    assert ts == (sec["schedule"]["timesteps"] if sec["enabled"] else plan["timesteps"])
