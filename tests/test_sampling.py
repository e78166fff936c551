import pytest
import torch

from diffpro_cli.sampling import SamplerConfig, parse_timesteps, sample, sample_generators, uniform_timesteps


def _diffusers_loop(model, scheduler, timesteps_loop, seed, idx, y):
    (g,) = sample_generators(seed, [idx])
    x = torch.randn(model.sample_shape, generator=g).unsqueeze(0)
    for t in timesteps_loop:
        eps = model.eps(x, torch.tensor([int(t)]), y)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
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
    ref = _diffusers_loop(tiny_model, sched, sched.timesteps, 1, 0, torch.tensor([0]))
    assert torch.allclose(ours[0], ref, atol=1e-4)


def test_ddim_eta0_deterministic_and_seed_matters(tiny_model):
    ts = uniform_timesteps(1000, 20)
    a = sample(tiny_model, 3, ts, seed=5)
    b = sample(tiny_model, 3, ts, seed=5)
    c = sample(tiny_model, 3, ts, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sample_i_independent_of_batch_size(tiny_model, method):
    ts = uniform_timesteps(1000, 10)
    cfg = SamplerConfig(method=method, eta=1.0 if method == "ddim" else 0.0, cfg_scale=2.0)
    big = sample(tiny_model, 5, ts, cfg, seed=2, batch_size=5)
    small = sample(tiny_model, 5, ts, cfg, seed=2, batch_size=2)
    assert torch.allclose(big, small, atol=1e-5)
    tail = sample(tiny_model, 2, ts, cfg, seed=2, batch_size=2, first_index=3)
    assert torch.allclose(big[3:], tail, atol=1e-5)


def test_cfg_changes_output_and_scale_one_is_conditional(tiny_model):
    ts = uniform_timesteps(1000, 10)
    plain = sample(tiny_model, 2, ts, SamplerConfig(cfg_scale=1.0), seed=0)
    guided = sample(tiny_model, 2, ts, SamplerConfig(cfg_scale=3.0), seed=0)
    assert not torch.allclose(plain, guided)


def test_any_increasing_subset_runs_and_bad_subsets_fail(tiny_model):
    from diffpro_cli.errors import UsageError

    out = sample(tiny_model, 1, [0, 3, 400, 999], seed=0)
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    for bad in ([], [5, 5], [10, 3], [0, 1000]):
        with pytest.raises(UsageError):
            sample(tiny_model, 1, bad)


def test_timestep_helpers():
    assert uniform_timesteps(1000, 1000) == list(range(1000))
    ts = uniform_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999
    assert parse_timesteps("999:0:250", 1000) == [249, 499, 749, 999]
    assert parse_timesteps("5,1,5", 1000) == [1, 5]
