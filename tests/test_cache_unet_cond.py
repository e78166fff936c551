"""DeepCache on a text-conditioned UNet2DConditionModel (SD 1.x/2.x/SDXL's denoiser, DeepCache's own target):
the same deep-part unit as a UNet2DModel, with cross-attention blocks on both sides of the cut."""

from __future__ import annotations

import json

import pytest
import torch

from diffpro_cli.cache import CacheSchedule, cached, num_cache_units, unet_deep_modules, unit_kind
from diffpro_cli.errors import UsageError

TS = [0, 140, 290, 430, 570, 710, 850, 999]
CROSS = 12


def _sd_unet():
    """Three levels, so the deep part holds a cross-attention down block, the cross-attention mid block and a
    cross-attention up block; the shallow part (down_blocks[0], up_blocks[-1]) attends to the text too."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=CROSS).eval()


@pytest.fixture(scope="module")
def net():
    return _sd_unet()


def _trajectory(net, text, **extra):
    """Drive the net as a sampler does (highest timestep first, x updated from each output); per call
    (x, t, output)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    calls = []
    with torch.no_grad():
        for t in sorted(TS, reverse=True):
            tt = torch.full((2,), t)
            out = net(x, tt, encoder_hidden_states=text, return_dict=False, **extra)[0]
            calls.append((x, tt, out))
            x = x - 0.1 * out
    return calls


def _text():
    return torch.randn(2, 5, CROSS, generator=torch.Generator().manual_seed(2))


def _shallow_by_hand(net, x, t, text, feat):
    """The output when the deep part returns `feat`: time embedding, conv_in, down_blocks[0] (with its
    cross-attention), up_blocks[-1] on (feat, its skip inputs), output layers, as diffusers' forward runs them."""
    emb = net.time_embedding(net.time_proj(t).to(x.dtype))
    h0 = net.conv_in(x)
    _, res = net.down_blocks[0](hidden_states=h0, temb=emb, encoder_hidden_states=text)
    up = net.up_blocks[-1]
    h = up(hidden_states=feat, res_hidden_states_tuple=((h0,) + res)[:len(up.resnets)], temb=emb, encoder_hidden_states=text)
    return net.conv_out(net.conv_act(net.conv_norm_out(h)))


def test_a_text_unet_is_one_deep_unit_and_the_all_computed_schedule_is_bit_identical(net):
    """Catches: UNet2DConditionModel refused (or taken for a DiT); a wrapper that changes a computed step
    (e.g. dropping encoder_hidden_states on the way to a cross-attention block); wrappers left installed."""
    assert unit_kind(net) == "unet" and num_cache_units(net) == 1
    deep = unet_deep_modules(net)
    assert deep[0] is net.down_blocks[1] and net.mid_block in deep and deep[-1] is net.up_blocks[-2]
    text = _text()
    ref = _trajectory(net, text)
    with cached(net, CacheSchedule.full(TS, 1)) as run:
        got = _trajectory(net, text)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(ref, got)) and run.compute_fraction == 1.0
    assert not any("forward" in vars(m) for m in deep)


def test_a_cached_step_reuses_the_deep_feature_under_the_new_shallow_pass_with_the_text(net):
    """Catches: a cached step that still runs the deep blocks (no saving), reuses the wrong step's feature,
    or feeds the shallow cross-attention the wrong text or skip inputs."""
    text = _text()
    sched = CacheSchedule(TS, 1, [{0}, set(), set(), {0}, set(), {0}, {0}, {0}])
    feats, mid_runs = [], [0]
    h_feat = net.up_blocks[-2].register_forward_hook(lambda m, a, o: feats.append(o.clone()))
    h_mid = net.mid_block.attentions[0].register_forward_hook(lambda m, a, o: mid_runs.__setitem__(0, mid_runs[0] + 1))
    try:
        with cached(net, sched) as run:
            calls = _trajectory(net, text)
    finally:
        h_feat.remove()
        h_mid.remove()
    assert run.evaluations == 5 and run.calls == 8 and mid_runs[0] == 5
    with torch.no_grad():
        for step, source in ((1, 0), (2, 0), (4, 3)):
            x, t, out = calls[step]
            assert torch.equal(feats[step], feats[source])
            assert torch.allclose(out, _shallow_by_hand(net, x, t, text, feats[source]), atol=1e-6, rtol=0)
        x, t, out = calls[3]
        assert not torch.equal(feats[3], feats[0])
        assert torch.allclose(out, _shallow_by_hand(net, x, t, text, feats[3]), atol=1e-6, rtol=0)
        # the text matters on a cached step: other text, same reused feature, other output
        other = _shallow_by_hand(net, calls[1][0], calls[1][1], -text, feats[0])   # (token order alone: attention ignores it)
        assert not torch.allclose(other, calls[1][2], atol=1e-4)


def test_controlnet_residuals_under_a_cache_are_refused_in_one_line(net):
    """Catches: ControlNet residuals silently added to placeholder features at cached steps (wrong images)
    instead of a clear refusal; the refusal leaking wrappers."""
    text = _text()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        mid = net(x, torch.full((2,), 999), encoder_hidden_states=text, return_dict=False)[0]   # uncached: fine
    assert mid.shape == x.shape
    sched = CacheSchedule(TS, 1, [{0}, set(), {0}, {0}, {0}, {0}, {0}, {0}])
    with pytest.raises(UsageError) as err, cached(net, sched):
        net(x, torch.full((2,), 999), encoder_hidden_states=text, mid_block_additional_residual=torch.zeros(2, 16, 2, 2))
    msg = str(err.value)
    assert "\n" not in msg and "mid_block_additional_residual" in msg and "without a cache" in msg
    assert not any("forward" in vars(m) for m in unet_deep_modules(net))


def test_an_sd_pipeline_dir_samples_with_deepcache_and_plans_a_cache(tmp_path):
    """The loaded model (text conditioning record, diffpro's sampler) under DeepCache every 2nd step: half the
    deep evaluations, a result close to but not equal to the uncached one; plan_cache proposes a schedule
    within its budget. Catches: the sampler's conditioning not reaching a cached U-Net; the planner refusing
    or mis-counting a text U-Net's unit."""
    from diffusers import DDIMScheduler

    from diffpro_cli.models.conditioning import conditioning_from_tensors
    from diffpro_cli.models.diffusers_dir import load_diffusers_dir
    from diffpro_cli.planning.cache_plan import CachePlanConfig, interval_schedule, plan_cache
    from diffpro_cli.sampling import SamplerConfig, sample

    net = _sd_unet()
    net.save_pretrained(tmp_path / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"],
                                                          "scheduler": ["diffusers", "DDIMScheduler"]}))
    model = load_diffusers_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    model.with_conditioning(conditioning_from_tensors({"prompt_embeds": torch.randn(2, 5, CROSS, generator=g)}))
    ref = sample(model, 2, TS, SamplerConfig(), seed=3, batch_size=2, decode=False)
    with cached(model, CacheSchedule(TS, 1, interval_schedule(len(TS), 1, 2, 0))) as run:
        out = sample(model, 2, TS, SamplerConfig(), seed=3, batch_size=2, decode=False)
    assert run.compute_fraction == pytest.approx(4 / 8)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, rel
    rec = plan_cache(model, TS, CachePlanConfig(fraction=0.7, n=2, batch=2, repeats=1, latency_batch=2, protect_tail=1))
    assert rec["results"] and all(r["compute_fraction"] <= 0.7 + 1e-9 for r in rec["results"].values())
    assert "fbcache" not in rec["results"] and len(rec["block_latency_ms"]) == 1
