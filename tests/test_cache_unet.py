"""DeepCache on a UNet2DModel (diffpro_cli/cache.py DeepCacheRunner): the deep part is one unit whose
output feature is reused; the shallow blocks run on every step's new input."""

from __future__ import annotations

import pytest
import torch

from diffpro_cli.cache import CacheSchedule, cached, num_cache_units, unet_deep_modules
from diffpro_cli.loading import load_model
from diffpro_cli.sampling import SamplerConfig, sample

TS = [0, 140, 290, 430, 570, 710, 850, 999]


@pytest.fixture(scope="module")
def unet():
    return load_model("random:unet-tiny")


def _run(model, n=2):
    return sample(model, n, TS, SamplerConfig(), seed=3, batch_size=n, decode=False)


def _shallow_by_hand(net, x, t, feat):
    """The U-Net's output when the deep part returns `feat`: time embedding, conv_in, down_blocks[0],
    up_blocks[-1] on (feat, its skip inputs), output layers, written out from diffusers' forward."""
    t = t.reshape(-1).expand(x.shape[0])
    emb = net.time_embedding(net.time_proj(t).to(x.dtype))
    h0 = net.conv_in(x)
    _, res = net.down_blocks[0](hidden_states=h0, temb=emb)
    up = net.up_blocks[-1]
    h = up(feat, ((h0,) + res)[:len(up.resnets)], emb)
    return net.conv_out(net.conv_act(net.conv_norm_out(h)))


def test_all_computed_schedule_is_bit_identical(unet):
    ref = _run(unet)
    with cached(unet, CacheSchedule.full(TS, 1)) as run:
        out = _run(unet)
    assert torch.equal(out, ref) and run.compute_fraction == 1.0
    assert num_cache_units(unet.net) == 1
    assert not any("forward" in vars(m) for m in unet_deep_modules(unet.net))   # wrappers removed on exit


def test_cached_step_reuses_the_previous_deep_feature_with_the_new_shallow_input(unet):
    net = unet.net
    sched = CacheSchedule(TS, 1, [{0}, set(), set(), {0}, set(), {0}, {0}, {0}])
    calls, feats = [], []
    h_in = net.register_forward_pre_hook(lambda m, a: calls.append([a[0].clone(), torch.as_tensor(a[1]).clone()]))
    h_out = net.register_forward_hook(lambda m, a, o: calls[-1].append(o[0].clone()))
    h_feat = net.up_blocks[-2].register_forward_hook(lambda m, a, o: feats.append(o.clone()))
    deep_runs = [0]
    h_mid = net.mid_block.resnets[0].register_forward_hook(lambda m, a, o: deep_runs.__setitem__(0, deep_runs[0] + 1))
    try:
        with cached(unet, sched) as run:
            _run(unet)
    finally:
        for h in (h_in, h_out, h_feat, h_mid):
            h.remove()
    assert len(calls) == len(TS) and run.evaluations == 5 and run.calls == 8
    assert deep_runs[0] == 5                              # the mid block never ran at the 3 cached steps
    with torch.no_grad():
        for step, source in ((1, 0), (2, 0), (4, 3)):
            x, t, out = calls[step]
            assert torch.equal(feats[step], feats[source])    # the deep feature of the last computed step ...
            assert torch.equal(out, _shallow_by_hand(net, x, t, feats[source]))   # ... under the new shallow pass
        x, t, out = calls[3]                                  # a computed step: the real deep feature differs
        assert not torch.equal(feats[3], feats[0])
        assert torch.equal(out, _shallow_by_hand(net, x, t, feats[3]))


def test_plan_cache_and_deepcache_rows_on_a_unet(unet, tmp_path):
    from diffpro_cli.planning.cache_plan import CachePlanConfig, plan_cache
    from diffpro_cli.stages.bench import BenchConfig, measure_bench
    from diffpro_cli.stages.context import StageContext

    rec = plan_cache(unet, TS, CachePlanConfig(fraction=0.7, n=2, batch=2, repeats=1, latency_batch=2, protect_tail=1))
    assert "fbcache" not in rec["results"] and rec["results"]        # the first-block policy is for DiTs
    assert all(r["compute_fraction"] <= 0.7 + 1e-9 for r in rec["results"].values())
    assert len(rec["block_latency_ms"]) == 1 and rec["block_latency_ms"][0] > 0
    ctx = StageContext.create("random:unet-tiny", tmp_path)
    cfg = BenchConfig(rows=["fp32", "deepcache-2", "deepcache-3", "fbcache-0.08"], reference_steps=9, repeats=1,
                      latency_batch=2, memory=False)
    report = measure_bench(ctx, cfg)
    rows = {r["name"]: r for r in report["rows"]}
    # 9 steps: every 2nd → steps 0,2,4,6,8 (5/9); every 3rd → 0,3,6 (3/9); the first step always computes
    assert rows["deepcache-2"]["compute_fraction"] == pytest.approx(5 / 9)
    assert rows["deepcache-3"]["compute_fraction"] == pytest.approx(3 / 9)
    assert "fbcache-0.08" not in rows and any("fbcache-0.08 row skipped" in n for n in report["notes"])
    # the figure's data: which steps recomputed the deep part, measured from the row's calls
    share = report["cache_schedules"]["deepcache-3"]["computed_share"]
    assert [s[0] for s in share] == [1.0, 0, 0, 1.0, 0, 0, 1.0, 0, 0]
    assert (tmp_path / "bench" / "figures" / "cache_schedule.png").stat().st_size > 0


def test_deepcache_with_regionally_compiled_deep_modules_matches_eager(unet):
    """bench --compile on a DeepCache row: the deep modules compiled one by one. Catches: the DeepCache
    wrappers calling the class forward instead of the compiled one (no frame compiled), a compiled deep
    module whose per-call residual bookkeeping differs (other evaluations, another output)."""
    from torch._dynamo.utils import counters

    from diffpro_cli.cache import unit_modules
    from diffpro_cli.quant import compiled

    if not compiled.compiled_available():
        pytest.skip(f"compiled path unavailable: {compiled.unavailable_reason()}")
    sched = CacheSchedule(TS, 1, [{0}, set(), set(), {0}, set(), {0}, {0}, {0}])
    with torch.no_grad(), cached(unet, sched) as eager_run:
        eager = _run(unet)
    deep = [m for unit in unit_modules(unet.net) for m in unit]
    torch._dynamo.reset()
    counters.clear()
    try:
        assert compiled.compile_regions(deep) == len(deep) >= 2
        with torch.no_grad(), cached(unet, sched) as run:
            out = _run(unet)
        assert counters["frames"]["ok"] >= len(deep)
    finally:
        compiled.remove_regions(deep)
        torch._dynamo.reset()
    assert run.evaluations == eager_run.evaluations == 5
    assert float((out - eager).norm() / eager.norm()) < 1e-4
