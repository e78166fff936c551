"""Caching across steps (diffpro_cli/cache.py): real execution on a tiny DiT built in-process."""

from __future__ import annotations

import pytest
import torch

from diffpro_cli.cache import CacheSchedule, FirstBlockCache, cached, policy_from_dict
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
