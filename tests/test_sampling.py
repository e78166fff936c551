import pytest
import torch

from diffpro_cli.sampling import SamplerConfig, parse_timesteps, sample, sample_generators, uniform_timesteps


def _diffusers_loop(model, scheduler, timesteps_loop, seed, idx, y, **step_kwargs):
    (g,) = sample_generators(seed, [idx])
    x = torch.randn(model.sample_shape, generator=g).unsqueeze(0)
    for t in timesteps_loop:
        eps = model.eps(x, torch.tensor([int(t)]), y)
        x = scheduler.step(eps, t, x, generator=g, **step_kwargs).prev_sample
    return x[0]


def test_full_ddpm_subset_equals_standard_ddpm(tiny_model):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small", clip_sample=True)
    sched.set_timesteps(1000)
    ours = sample(tiny_model, 2, list(range(1000)), SamplerConfig(method="ddpm"), seed=3, batch_size=2)
    for i in range(2):
        ref = _diffusers_loop(tiny_model, sched, sched.timesteps, 3, i, torch.tensor([i % 10]))
        assert torch.allclose(ours[i], ref, atol=1e-4), (ours[i] - ref).abs().max()


def test_ddim_subset_equals_diffusers_ddim(tiny_model):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True,
                          timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(50)
    subset = sorted(int(t) for t in sched.timesteps)
    ours = sample(tiny_model, 1, subset, SamplerConfig(method="ddim", eta=0.0), seed=1)
    ref = _diffusers_loop(tiny_model, sched, sched.timesteps, 1, 0, torch.tensor([0]), use_clipped_model_output=True)
    assert torch.allclose(ours[0], ref, atol=1e-4)
    unclipped = sample(tiny_model, 1, subset, SamplerConfig(method="ddim", eta=0.0, clip_x0=False), seed=1)
    sched_nc = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                             timestep_spacing="leading", steps_offset=0)
    sched_nc.set_timesteps(50)
    ref_nc = _diffusers_loop(tiny_model, sched_nc, sched_nc.timesteps, 1, 0, torch.tensor([0]))
    assert torch.allclose(unclipped[0], ref_nc, atol=1e-4)


def test_ddim_eta0_same_seed_same_samples_other_seed_differs(tiny_model):
    ts = uniform_timesteps(1000, 20)
    a = sample(tiny_model, 3, ts, seed=5)
    b = sample(tiny_model, 3, ts, seed=5)
    c = sample(tiny_model, 3, ts, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_each_sample_depends_only_on_seed_and_index_not_batching(tiny_model, method):
    ts = uniform_timesteps(1000, 10)
    cfg = SamplerConfig(method=method, eta=1.0 if method == "ddim" else 0.0, cfg_scale=2.0)
    big = sample(tiny_model, 5, ts, cfg, seed=2, batch_size=5)
    small = sample(tiny_model, 5, ts, cfg, seed=2, batch_size=2)
    assert torch.allclose(big, small, atol=1e-5)
    tail = sample(tiny_model, 2, ts, cfg, seed=2, batch_size=2, first_index=3)
    assert torch.allclose(big[3:], tail, atol=1e-5)


def test_cfg_is_uncond_plus_scale_times_difference_and_scale_one_calls_only_the_conditional_model(tiny_model):
    from diffpro_cli.sampling import guided_eps

    null = tiny_model.null_class
    assert null is not None
    torch.manual_seed(0)
    x, y = torch.randn(2, *tiny_model.sample_shape), torch.tensor([3, 7])
    t = torch.full((2,), 500)
    with torch.no_grad():
        cond, uncond = tiny_model.eps(x, t, y), tiny_model.eps(x, t, torch.full_like(y, null))
        assert torch.allclose(guided_eps(tiny_model, x, 500, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-6)
    seen = []
    forward = tiny_model.forward_fn
    tiny_model.forward_fn = lambda net, x, t, y: (seen.append(y.clone()), forward(net, x, t, y))[1]
    ts = uniform_timesteps(1000, 10)
    plain = sample(tiny_model, 2, ts, SamplerConfig(cfg_scale=1.0), seed=0)
    assert seen and not any(bool((labels == null).any()) for labels in seen)   # scale 1: no unconditional pass
    seen.clear()
    guided = sample(tiny_model, 2, ts, SamplerConfig(cfg_scale=3.0), seed=0)
    assert any(bool((labels == null).any()) for labels in seen)
    assert not torch.allclose(plain, guided)


def test_any_increasing_subset_runs_and_bad_subsets_fail(tiny_model):
    from diffpro_cli.errors import UsageError

    out = sample(tiny_model, 1, [0, 3, 400, 999], seed=0)
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    for bad in ([], [5, 5], [10, 3], [0, 1000]):
        with pytest.raises(UsageError):
            sample(tiny_model, 1, bad)


def test_uniform_timesteps_span_0_to_999_and_parse_timesteps_sorts_and_dedups():
    assert uniform_timesteps(1000, 1000) == list(range(1000))
    ts = uniform_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999
    assert parse_timesteps("999:0:250", 1000) == [249, 499, 749, 999]
    assert parse_timesteps("5,1,5", 1000) == [1, 5]


@pytest.mark.parametrize("channels, png_channels", [(1, 1), (3, 3), (4, 3), (2, 1)])
def test_save_grid_any_channel_count(tmp_path, channels, png_channels):
    import struct
    import zlib

    from diffpro_cli.sampling import save_grid

    x = torch.linspace(-1, 1, 3 * channels * 8 * 8).reshape(3, channels, 8, 8)
    save_grid(x, tmp_path / "g.png", nrow=3)
    data = (tmp_path / "g.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height) == (3 * 10 + 2, 12) and depth == 8 and color == {1: 0, 3: 2}[png_channels]
    idat = data[data.index(b"IDAT") + 4:]
    raw = zlib.decompress(idat[:struct.unpack(">I", data[data.index(b"IDAT") - 4:data.index(b"IDAT")])[0]])
    assert len(raw) == height * (1 + width * png_channels)


def test_x0_clipping_defaults_to_pixel_space_only(tiny_model):
    """SamplerConfig() clips predicted x0 for pixel-space models and not for VAE-latent ones (their
    diffusers pipelines do not clip). Catches the old always-on default (which changed every latent
    model's samples) and a resolution that ignores an explicit --clip-x0/--no-clip-x0."""
    import dataclasses

    from diffpro_cli.sampling import SamplerConfig, sample, uniform_timesteps

    ts = uniform_timesteps(1000, 10)
    run = lambda m, cfg: sample(m, 4, ts, cfg, torch.arange(4), seed=0, decode=False)   # noqa: E731
    clipped, raw = SamplerConfig(clip_x0=True), SamplerConfig(clip_x0=False)
    assert not torch.equal(run(tiny_model, clipped), run(tiny_model, raw))          # clipping matters here
    assert torch.equal(run(tiny_model, SamplerConfig()), run(tiny_model, clipped))
    latent = dataclasses.replace(tiny_model, config={"decode": {"type": "vae", "path": "/x", "scaling_factor": 0.18215}})
    assert not latent.clip_x0_default and tiny_model.clip_x0_default
    assert torch.equal(run(latent, SamplerConfig()), run(latent, raw))
    assert torch.equal(run(latent, clipped), run(tiny_model, clipped))               # explicit choice wins


@pytest.mark.parametrize("seed", [2 ** 63, 10 ** 14, 2 ** 64 + 5, -(2 ** 70)])
def test_a_large_seed_samples_instead_of_overflowing(tiny_model, seed):
    """--seed 10**14 (or `date +%s%N`) overflowed torch's manual_seed in seed * stride + index: a ValueError
    traceback (exit 1) from sample, prune, profile and bench."""
    x = sample(tiny_model, 2, [999], seed=seed, batch_size=1)
    assert torch.isfinite(x).all()
    assert not torch.equal(x, sample(tiny_model, 2, [999], seed=seed + 1, batch_size=1))


def test_seeds_that_worked_keep_their_noise():
    """The overflow fix must not move a seed torch took as it was (negative seeds included)."""
    from diffpro_cli.sampling import SAMPLE_SEED_STRIDE

    for seed in (0, 7, -1, 2 ** 40):
        (g,) = sample_generators(seed, [3])
        ref = torch.Generator().manual_seed(seed * SAMPLE_SEED_STRIDE + 3)
        assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=ref))
