"""Prediction types and schedules: v-prediction DDIM and flow-matching Euler against the diffusers schedulers
they mirror (same model outputs fed to both), and prune's drift on a flow model."""

import dataclasses

import pytest
import torch

from diffpro_cli.models.base import apply_net_patches, flow_alphas_cumprod, flow_sigmas
from diffpro_cli.sampling import SamplerConfig, sample, sample_generators, split_prediction, flow_step, uniform_timesteps


def flow_model(tiny_model, shift=3.0):
    """The tiny test network read as a flow-matching velocity predictor on the shifted sigma schedule."""
    net = tiny_model.net
    patch = {"flow_timesteps": {"num_train_timesteps": 1000, "shift": shift}}
    apply_net_patches(net, patch)
    return dataclasses.replace(tiny_model, prediction_type="flow", flow_shift=shift,
                               alphas_cumprod=flow_alphas_cumprod(flow_sigmas(1000, shift)),
                               config={"prediction_type": "flow", "flow_shift": shift, "net_patches": patch})


def _x_T(model, seed, idx):
    (g,) = sample_generators(seed, [idx])
    return torch.randn(model.sample_shape, generator=g).unsqueeze(0)


def test_flow_training_sigmas_are_diffusers_flow_match_sigmas_and_alphas_keep_the_snr():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = flow_sigmas(1000, 3.0)
    assert torch.allclose(ours.flip(0).float(), sched.sigmas.float(), atol=1e-6)
    assert ours[-1] == 1.0 and ours[0] > 0
    acp = flow_alphas_cumprod(ours)
    assert torch.allclose(acp / (1 - acp.clamp_max(1 - 1e-300)), ((1 - ours) / ours) ** 2, rtol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
def test_v_prediction_ddim_equals_diffusers_ddim_v_prediction_step_by_step(tiny_model, clip):
    from diffusers import DDIMScheduler

    model = dataclasses.replace(tiny_model, prediction_type="v_prediction")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True,
                          timestep_spacing="leading", steps_offset=0, prediction_type="v_prediction")
    sched.set_timesteps(25)
    subset = sorted(int(t) for t in sched.timesteps)
    y = torch.tensor([4])
    ours = sample(model, 1, subset, SamplerConfig(method="ddim", eta=0.0, clip_x0=clip), labels=y, seed=2)
    x = _x_T(model, 2, 0)
    with torch.no_grad():
        for t in sched.timesteps:
            v = model.raw(x, torch.tensor([int(t)]), y)     # the network's own v output, fed to diffusers
            x = sched.step(v, t, x, use_clipped_model_output=clip).prev_sample
    err = (ours[0] - x[0]).abs().max().item()
    assert err < 1e-5, err


def test_v_to_eps_conversion_is_sqrt_abar_v_plus_sqrt_one_minus_abar_x(tiny_model):
    model = dataclasses.replace(tiny_model, prediction_type="v_prediction")
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        v = model.raw(x, t, y)
        a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        assert torch.allclose(model.eps(x, t, y), a.sqrt() * v + (1 - a).sqrt() * x, atol=1e-6)
    with pytest.raises(Exception, match="flow-matching"):
        model.velocity(x, t, y)


@pytest.mark.parametrize("steps", [1, 8, 28])
def test_flow_euler_equals_diffusers_flow_match_euler_shift3_step_by_step(tiny_model, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = flow_model(tiny_model, 3.0)
    subset = uniform_timesteps(1000, steps)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    # the subset's unshifted sigmas (i + 1)/N, highest first; the scheduler shifts them itself
    sched.set_timesteps(sigmas=[(i + 1) / 1000 for i in subset[::-1]])
    assert torch.allclose(sched.timesteps.double(), model.sigmas()[subset[::-1]] * 1000, rtol=1e-6)
    y = torch.tensor([7])
    ours = sample(model, 1, subset, SamplerConfig(method="euler", clip_x0=False), labels=y, seed=4)
    x = _x_T(model, 4, 0)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = model.net(x, t.expand(1), y)       # a float timestep passes the index hook unchanged
            assert torch.allclose(v, model.velocity(x, torch.tensor([subset[::-1][i]]), y), atol=1e-6)
            x = sched.step(v, t, x).prev_sample
    err = (ours[0] - x[0]).abs().max().item()
    assert err < 1e-5, err
    # "ddim" with eta 0 is the same update for a flow model; ddpm is refused
    assert torch.allclose(sample(model, 1, subset, SamplerConfig(method="ddim", clip_x0=False), labels=y, seed=4), ours, atol=1e-5)
    with pytest.raises(Exception, match="flow-matching"):
        sample(model, 1, subset, SamplerConfig(method="ddpm"), labels=y, seed=4)


def test_flow_eps_is_x_plus_one_minus_sigma_v_and_clipped_step_is_ddim_in_flow_form(tiny_model):
    model = flow_model(tiny_model, 3.0)
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 1, 8, 8) * 2, torch.tensor([999, 300]), torch.tensor([0, 5])
    with torch.no_grad():
        v = model.velocity(x, t, y)
        sig = model.sigmas()[t].float().view(-1, 1, 1, 1)
        assert torch.allclose(model.eps(x, t, y), x + (1 - sig) * v, atol=1e-6)
        x0, eps = split_prediction(True, 1 - sig, sig, x, v)
        assert torch.allclose((1 - sig) * x0 + sig * eps, x, atol=1e-5)     # x_σ = (1 − σ)·x0 + σ·ε
    # unclipped, the DDIM-form update equals the Euler step
    s, s2 = 0.7, 0.4
    xa, va = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    euler = flow_step(xa, va, s, s2, SamplerConfig(clip_x0=False))
    x0, eps = xa - s * va, xa + (1 - s) * va
    assert torch.allclose(euler, (1 - s2) * x0 + s2 * eps, atol=1e-6)
    clipped = flow_step(xa * 5, va, s, s2, SamplerConfig(clip_x0=True))
    x0c = (xa * 5 - s * va).clamp(-1, 1)
    assert torch.allclose(clipped, (1 - s2) * x0c + s2 * (xa * 5 - (1 - s) * x0c) / s, atol=1e-5)


@pytest.mark.parametrize("clip", [False, True])
def test_local_drift_matrix_on_a_flow_teacher_equals_explicit_euler_steps(tiny_model, clip):
    import numpy as np

    from diffpro_cli.stages.prune import PruneConfig, local_drift_matrix, run_teacher

    model = flow_model(tiny_model, 3.0)
    cfg = PruneConfig(n=2, clip_x0=clip)
    reference = uniform_timesteps(1000, 40)
    cands = reference[::-1][::5] + [reference[0]]
    cands = sorted(set(cands))[::-1]
    teacher = run_teacher(model, reference, set(cands), cfg, torch.tensor([1, 2]))
    cost = local_drift_matrix(teacher, cands, model, clip_x0=clip)
    sig = model.sigmas()
    sc = SamplerConfig(clip_x0=clip)
    for i, j in [(0, 1), (0, 3), (2, 5), (1, len(cands))]:
        a = cands[i]
        target = teacher.x[cands[j]] if j < len(cands) else teacher.final
        s_next = float(sig[cands[j]]) if j < len(cands) else 0.0
        moved = flow_step(teacher.x[a], teacher.eps[a], float(sig[a]), s_next, sc)
        explicit = float(((moved.double() - target.double()) ** 2).mean())
        assert np.isclose(cost[i, j], explicit, rtol=1e-4, atol=1e-9), (i, j, cost[i, j], explicit)


def test_select_timesteps_runs_on_a_flow_model_and_records_its_sigma_schedule(tiny_model):
    from diffpro_cli.stages.prune import PruneConfig, select_timesteps

    model = flow_model(tiny_model, 3.0)
    out = select_timesteps(model, PruneConfig(steps=6, n=2, batch=2, reference_steps=60, candidates=20))
    ts = out["timesteps"]
    assert len(ts) == 6 and ts[-1] == 999 and ts == sorted(ts)
    assert out["schedule"]["type"] == "flow-matching sigmas" and out["schedule"]["shift"] == 3.0
    assert out["schedule"]["sigmas"] == [float(model.sigmas()[t]) for t in ts]
    assert out["drift"] <= out["uniform_drift"] + 1e-12
    # the selected subset samples with the Euler sampler
    assert torch.isfinite(sample(model, 2, ts, SamplerConfig(method="euler"), seed=0)).all()
