"""The exported scheduler (`diffusers_scheduler(OUT)`) walks diffpro's own trajectory for v-prediction and
flow-matching models too, not only epsilon ones."""

import json

import torch

import diffpro
from diffpro_cli.export import diffusers_scheduler, export_diffusers
from diffpro_cli.sampling import SamplerConfig, sample, sample_generators

TS = [0, 40, 150, 420, 700, 999]   # not uniformly spaced


def _timesteps(tmp_path):
    path = tmp_path / "timesteps.json"
    path.write_text(json.dumps({"schema": "diffpro.timesteps/1", "timesteps": TS}))
    return path


def _diffusers_loop(model, sched, labels, seed=3):
    """diffusers' denoising loop: the network's raw output at the scheduler's own timesteps (flow
    schedulers neither scale the noise nor the model input)."""
    x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in sample_generators(seed, [0, 1])])
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    scale_input = getattr(sched, "scale_model_input", lambda x, t: x)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model.raw(scale_input(x, t), t.expand(2), labels)
            x = sched.step(out, t, x).prev_sample
    return x


def test_v_prediction_export_schedules_v_prediction(tmp_path, tiny_dit):
    """Bug caught: the exported EulerDiscreteScheduler said prediction_type "epsilon" for a v-prediction
    model, so diffusers read its v output as noise (samples ~175x their norm off on this model)."""
    from diffusers import DDPMScheduler

    pipe = tmp_path / "pipe"
    tiny_dit().save_pretrained(pipe / "transformer")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                       "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    # weight-only: the scheduler is under test, not int8 activation rounding
    diffpro.quantize(str(pipe), tmp_path / "work", bits=8, act_bits=16, timesteps_path=_timesteps(tmp_path),
                     out_dir=tmp_path / "q")
    export_diffusers(tmp_path / "q", tmp_path / "out")
    model = diffpro.load(tmp_path / "out")
    assert model.prediction_type == "v_prediction"
    sched = diffusers_scheduler(tmp_path / "out")
    assert sched.config.prediction_type == "v_prediction"
    labels = torch.tensor([1, 2])
    ours = sample(model, 2, TS, SamplerConfig(method="ddim", clip_x0=False), labels=labels, seed=3, batch_size=2, decode=False)
    theirs = _diffusers_loop(model, sched, labels)
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel < 1e-4, rel


def test_flow_export_schedules_flow_matching_euler_on_diffpros_sigmas(tmp_path):
    """Bug caught: a flow model's export wrote an EulerDiscreteScheduler from its ᾱ (0 at σ = 1): the first
    sigma was inf and the first step gave NaN samples in diffusers."""
    diffpro.quantize("builtin:flow-mnist", tmp_path / "work", bits=8, act_bits=16, timesteps_path=_timesteps(tmp_path),
                     out_dir=tmp_path / "q")
    export_diffusers(tmp_path / "q", tmp_path / "out")
    model = diffpro.load(tmp_path / "out")
    sched = diffusers_scheduler(tmp_path / "out")
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    want = model.sigmas()[sorted(TS, reverse=True)]
    assert torch.allclose(sched.sigmas[:-1].double(), want, rtol=1e-6) and float(sched.sigmas[-1]) == 0.0
    # the network is called at σ·N, as diffpro's flow timestep patch calls it
    assert torch.allclose(sched.timesteps.double(), want * model.num_train_timesteps, rtol=1e-6)
    cond = model.conditioning_set.take(0, 2)
    ours = sample(model, 2, TS, SamplerConfig(method="euler", clip_x0=False), labels=cond, seed=3, batch_size=2, decode=False)
    theirs = _diffusers_loop(model, sched, cond)
    assert torch.isfinite(theirs).all()
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel < 1e-4, rel
