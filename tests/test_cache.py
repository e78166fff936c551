"""Caching across steps (diffpro_cli/cache.py): real execution on a tiny DiT built in-process."""

from __future__ import annotations

import pytest
import torch

from diffpro_cli.cache import CacheSchedule, FirstBlockCache, cache_units, cached, policy_from_dict
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel, dit_forward, linear_alphas_cumprod
from diffpro_cli.sampling import SamplerConfig, sample

TS = [0, 100, 250, 400, 550, 700, 850, 999]   # 8 steps; sampling order is 999 → 0


@pytest.fixture(scope="module")
def tiny():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    # diffusers zero-initialises the adaLN-Zero gates: every block would be the identity; give them weights
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return DiffusionModel(spec="tiny", net=net, kind="dit", sample_shape=(4, 8, 8),
                          alphas_cumprod=linear_alphas_cumprod(), forward_fn=dit_forward, num_classes=10)


def _run(model, cfg_scale=1.0, n=3, batch=2):
    return sample(model, n, TS, SamplerConfig(cfg_scale=cfg_scale), seed=5, batch_size=batch, decode=False)


def _count_attn(model):
    counts = [0] * len(model.net.transformer_blocks)
    handles = [b.attn1.register_forward_hook(lambda m, a, o, u=u: counts.__setitem__(u, counts[u] + 1))
               for u, b in enumerate(model.net.transformer_blocks)]
    return counts, handles


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_full_schedule_reproduces_uncached_samples_bit_for_bit(tiny, cfg_scale):
    ref = _run(tiny, cfg_scale)
    with cached(tiny, CacheSchedule.full(TS, 3)) as run:
        out = _run(tiny, cfg_scale)
    assert torch.equal(out, ref)
    assert run.compute_fraction == 1.0
    with cached(tiny, FirstBlockCache(TS, 3, threshold=0.0)) as run:   # change >= 0 always: computes everything
        out = _run(tiny, cfg_scale)
    assert torch.equal(out, ref) and run.compute_fraction == 1.0
    assert "forward" not in vars(tiny.net.transformer_blocks[0])       # wrappers removed on exit
    assert torch.equal(_run(tiny, cfg_scale), ref)


def test_cached_unit_is_previous_residual_on_new_input_and_runs_nothing(tiny):
    K = len(TS)
    computed = [{0, 1, 2}] + [{0, 2}] * 3 + [{0, 1, 2}] * (K - 4)     # unit 1 reused at steps 1..3
    sched = CacheSchedule(TS, 3, computed)
    seen = []   # (step, input, output) of block 1, as its caller sees them
    blk = tiny.net.transformer_blocks[1]
    h = blk.register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), o.clone())))
    counts, handles = _count_attn(tiny)
    try:
        with cached(tiny, sched) as run:
            _run(tiny, cfg_scale=3.0, n=2, batch=2)   # one batch, CFG doubles it inside one call per step
    finally:
        for x in handles + [h]:
            x.remove()
    assert len(seen) == K
    r0 = seen[0][1] - seen[0][0]
    for i in (1, 2, 3):
        x_in, x_out = seen[i]
        assert not torch.equal(x_in, seen[0][0])            # a new input ...
        assert torch.equal(x_out, x_in + r0)                # ... plus the residual of step 0, exactly
    r4 = seen[4][1] - seen[4][0]
    assert not torch.equal(r4, r0)
    assert counts == [K, K - 3, K]                          # block 1's attention never ran at steps 1..3
    assert run.evaluations == sum(len(s) for s in computed) and run.calls == K
    assert run.compute_fraction == pytest.approx(sched.compute_fraction())


def test_new_batch_starts_a_new_trajectory(tiny):
    computed = [{0, 1, 2}] + [{0}] * (len(TS) - 1)
    sched = CacheSchedule(TS, 3, computed)
    with cached(tiny, sched):
        both = _run(tiny, n=4, batch=2)
    with cached(tiny, sched):
        second = sample(tiny, 2, TS, SamplerConfig(), seed=5, batch_size=2, first_index=2, decode=False)
    assert torch.equal(both[2:], second)   # batch 2 reuses its own residuals, not batch 1's


def test_fbcache_skips_the_rest_and_adds_their_combined_residual(tiny):
    pol = FirstBlockCache(TS, 3, threshold=1e9, protect_tail=2)   # skip whenever allowed
    counts, handles = _count_attn(tiny)
    ins, outs = [], []
    h1 = tiny.net.transformer_blocks[1].register_forward_hook(lambda m, a, o: ins.append(a[0].clone()))
    h2 = tiny.net.transformer_blocks[2].register_forward_hook(lambda m, a, o: outs.append(o.clone()))
    try:
        with cached(tiny, pol) as run:
            _run(tiny, n=2, batch=2)
    finally:
        for x in handles + [h1, h2]:
            x.remove()
    K = len(TS)
    forced = 1 + 2
    assert counts == [K, forced, forced]
    assert run.evaluations == K + 2 * forced
    assert [e["computed"] for e in run.log] == [[0, 1, 2]] + [[0]] * (K - forced) + [[0, 1, 2]] * 2
    # at a skipped step block 1 passes its input through and block 2 adds step 0's combined residual
    comb = outs[0] - ins[0]
    assert torch.equal(outs[1], ins[1] + comb)


def test_schedule_errors(tiny):
    with pytest.raises(InputError, match="first step"):
        CacheSchedule(TS, 3, [{0}] * len(TS))
    with pytest.raises(InputError, match="steps"):
        CacheSchedule(TS, 3, [{0, 1, 2}])
    with pytest.raises(UsageError, match="timestep"):
        with cached(tiny, CacheSchedule.full(TS, 3)):
            sample(tiny, 1, [0, 500, 999], SamplerConfig(), decode=False)
    with pytest.raises(InputError, match="units"):
        cached(tiny, CacheSchedule.full(TS, 4))
    d = CacheSchedule(TS, 3, [{0, 1, 2}] + [{1}] * 7).as_dict()
    assert policy_from_dict(d).computed == CacheSchedule(TS, 3, [{0, 1, 2}] + [{1}] * 7).computed


# ---------------------------------------------------------------------------------------------
# the planner's solvers, on hand-made tables with known optima
# ---------------------------------------------------------------------------------------------

import itertools

import numpy as np

from diffpro_cli.errors import BudgetError
from diffpro_cli.planning.cache_plan import choose_counts, forced_steps, interval_schedule, unit_curve


def _brute_curve(D, forced, max_gap):
    K = len(forced)
    best = np.full(K + 1, np.inf)
    free = [i for i in range(K) if not forced[i]]
    for r in range(len(free) + 1):
        for extra in itertools.combinations(free, r):
            comp = sorted(set(np.flatnonzero(forced)) | set(extra))
            if any(b - a > max_gap for a, b in zip(comp + [K], comp[1:] + [K])) or K - comp[-1] > max_gap:
                continue
            cost, last = 0.0, 0
            for s in range(K):
                if s in comp:
                    last = s
                else:
                    cost += D[last, s]
            best[len(comp)] = min(best[len(comp)], cost)
    return best


@pytest.mark.parametrize("max_gap,tail", [(2, 1), (3, 2), (4, 0), (9, 1)])
def test_unit_curve_is_the_exact_optimum(max_gap, tail):
    rng = np.random.default_rng(3)
    K = 9
    D = rng.random((K, K)) * np.triu(np.ones((K, K)), 1) + np.tril(np.full((K, K), np.inf))
    forced = forced_steps(K, tail)
    forced[4] = True   # a forced step in the middle cannot be skipped
    best, paths = unit_curve(D, forced, max_gap)
    ref = _brute_curve(D, forced, max_gap)
    assert np.allclose(best, ref) and np.array_equal(np.isfinite(best), np.isfinite(ref))
    for m in np.flatnonzero(np.isfinite(best)):
        p = paths[m]
        assert len(p) == m and p[0] == 0 and set(np.flatnonzero(forced)) <= set(p)
        cost = sum(D[max(c for c in p if c <= s), s] for s in range(K) if s not in p)
        assert cost == pytest.approx(best[m])


def test_choose_counts_matches_brute_force_within_budget():
    inf = np.inf
    curves = [np.array([inf, 9.0, 4.0, 1.0, 0.0]),
              np.array([inf, inf, 5.0, 2.0, 0.0]),
              np.array([inf, 3.0, 2.5, 0.5, 0.0])]
    cost = [1.0, 2.0, 1.5]
    for budget in (6.5, 8.0, 10.0, 13.5, 100.0):
        counts, err = choose_counts(curves, cost, budget)
        feasible = [(sum(c[m] for c, m in zip(curves, ms)), ms) for ms in itertools.product(range(5), repeat=3)
                    if all(np.isfinite(c[m]) for c, m in zip(curves, ms)) and sum(k * m for k, m in zip(cost, ms)) <= budget]
        assert err == pytest.approx(min(f[0] for f in feasible))
        assert sum(k * m for k, m in zip(cost, counts)) <= budget
    # worked by hand: at budget 10, (4, 2, 1) costs 4 + 4 + 1.5 = 9.5 and loses 0 + 5 + 3 = 8; the runner-up
    # (3, 2, 2) costs exactly 10 and loses 8.5
    assert choose_counts(curves, cost, 10.0) == ([4, 2, 1], 8.0)
    assert choose_counts(curves, cost, 6.5) == ([1, 2, 1], 17.0)
    with pytest.raises(BudgetError, match="cheapest"):
        choose_counts(curves, cost, 6.4)


def test_interval_schedule():
    s = interval_schedule(8, 2, 3, 2)
    assert [len(x) for x in s] == [2, 0, 0, 2, 0, 0, 2, 2]


def test_plan_cache_end_to_end_on_tiny_dit(tiny):
    from diffpro_cli.planning.cache_plan import CachePlanConfig, plan_cache

    rec = plan_cache(tiny, TS, CachePlanConfig(fraction=0.7, n=2, batch=2, repeats=1, latency_batch=2, protect_tail=1))
    assert set(rec["results"]) >= {"per-unit", "aligned", "interval"}
    for name, r in rec["results"].items():
        assert r["compute_fraction"] <= 0.7 + 1e-9, name       # every proposal is within the budget, measured
    assert rec["drift"] == min(r["drift"] for r in rec["results"].values())
    pol = rec["schedule"]
    if pol["policy"] == "static":
        steps = pol["steps"]
        assert steps[0]["computed"] == [0, 1, 2] and steps[-1]["computed"] == [0, 1, 2]   # first and protected last
    # the written schedule replays to the measured compute fraction
    from diffpro_cli.cache import policy_from_dict

    with cached(tiny, policy_from_dict(pol)) as run:
        sample(tiny, 2, TS, SamplerConfig(), seed=0, batch_size=2, decode=False)
    assert run.compute_fraction == pytest.approx(rec["compute_fraction"])
    with pytest.raises(BudgetError):
        plan_cache(tiny, TS, CachePlanConfig(fraction=0.1, n=2, batch=2, repeats=1, latency_batch=2, max_gap=2))


def test_bench_cache_rows_report_measured_compute_fraction(tmp_path):
    import json

    from diffpro_cli.planning.cache_plan import CachePlanConfig, cache_plan_for
    from diffpro_cli.stages.bench import BenchConfig, measure_bench
    from diffpro_cli.stages.context import StageContext

    ctx = StageContext.create("builtin:dit-mnist", tmp_path)
    ref_ts = __import__("diffpro_cli.sampling", fromlist=["x"]).uniform_timesteps(1000, 6)
    rec, planned = cache_plan_for(ctx.model(), ref_ts, tmp_path, CachePlanConfig(fraction=0.7, n=2, batch=2, repeats=1, latency_batch=2))
    assert planned and (tmp_path / "cache.json").is_file()
    assert cache_plan_for(ctx.model(), ref_ts, tmp_path)[1] is False      # re-used: same model and timesteps
    cfg = BenchConfig(rows=["fp32", "cache-only", "fbcache-0.12"], reference_steps=6, repeats=1, latency_batch=2, memory=False)
    measure_bench(ctx, cfg)
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]}
    assert rows["fp32"]["compute_fraction"] == 1.0
    assert rows["cache-only"]["compute_fraction"] == pytest.approx(rec["compute_fraction"])   # static: deterministic
    assert rows["cache-only"]["compute_fraction"] <= 0.7 + 1e-9
    assert 0 < rows["fbcache-0.12"]["compute_fraction"] <= 1.0
    assert "forward" not in vars(ctx.model().net.transformer_blocks[0])


def test_block_latencies_time_every_block_on_its_captured_input(tiny):
    from diffpro_cli.planning.cache_plan import CachePlanConfig, block_latencies
    from diffpro_cli.planning.costs import capture_inputs

    blocks = {str(u): b for u, b in enumerate(cache_units(tiny.net))}
    inputs, _ = capture_inputs(tiny, blocks, 2)
    assert set(inputs) == set(blocks) and all(isinstance(a[0][0], torch.Tensor) for a in inputs.values())
    ms = block_latencies(tiny, CachePlanConfig(repeats=2, latency_batch=2))
    assert len(ms) == len(blocks) and all(0 < v < float("inf") for v in ms)


def test_joint_blocks_reuse_both_streams_residuals_exactly():
    """SD3-style joint blocks (the built-in flow model: 4 blocks, the last context-pre-only) take and return
    (context, image) streams, and the network sees σ·1000, not diffpro's index. Catches: a cache that only
    handles one tensor per block (crash, or the context stream silently dropped), a reused unit whose
    outputs are not exactly the new inputs plus both residuals of the last computed step, and the step
    lookup reading the mapped flow timestep instead of the index."""
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import default_labels, uniform_timesteps

    m = load_model("builtin:flow-mnist")
    ts = uniform_timesteps(1000, 5)
    labels = default_labels(m, 2)

    def run():
        return sample(m, 2, ts, SamplerConfig(method="euler"), labels=labels, seed=5, batch_size=2, decode=False)

    ref = run()
    with cached(m, CacheSchedule.full(ts, 4)) as r:
        assert torch.equal(run(), ref) and r.compute_fraction == 1.0
    seen = []   # per call of block 1: (image in, context in, image out, context out)
    block = m.net.transformer_blocks[1]
    attn_calls = []
    h1 = block.register_forward_hook(lambda mod, a, kw, out: seen.append(
        (kw["hidden_states"], kw["encoder_hidden_states"], out[1], out[0])), with_kwargs=True)
    h2 = block.attn.register_forward_hook(lambda *a: attn_calls.append(1))
    try:
        with cached(m, CacheSchedule(ts, 4, [{0, 1, 2, 3}, {0, 2, 3}, {0, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}])) as r:
            out = run()
    finally:
        h1.remove()
        h2.remove()
    assert len(seen) == 5 and len(attn_calls) == 3           # steps 1, 2 ran no attention in block 1
    h0, e0, ho, eo = seen[0]
    for step in (1, 2):
        h, e, o_h, o_e = seen[step]
        assert torch.equal(o_h, h + (ho - h0)) and torch.equal(o_e, e + (eo - e0))
    assert r.compute_fraction == pytest.approx(18 / 20) and not torch.equal(out, ref)
    with cached(m, FirstBlockCache(ts, 4, threshold=10.0, protect_tail=1)) as r:   # skips blocks 1-3 after step 0
        out = run()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert r.compute_fraction == pytest.approx((4 + 3 * 1 + 4) / 20)


def test_plan_cache_runs_on_joint_blocks():
    """Catches: calibration summing the blocks' residuals into the stack's when the last joint block
    (context-pre-only) returns the image stream alone (shape mismatch crash in allocate --cache)."""
    from diffpro_cli.loading import load_model
    from diffpro_cli.planning.cache_plan import CachePlanConfig, plan_cache
    from diffpro_cli.sampling import uniform_timesteps

    m = load_model("builtin:flow-mnist")
    rec = plan_cache(m, uniform_timesteps(1000, 6), CachePlanConfig(n=2, batch=2, repeats=1, fraction=0.7,
                                                                    proposals=("aligned", "interval"), step_cut=False))
    assert rec["compute_fraction"] <= 0.7 + 1e-9 and rec["drift"] >= 0
    assert set(rec["results"]) == {"aligned", "interval"}
