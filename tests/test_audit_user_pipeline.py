"""A quantized network dropped into diffusers' DDPMPipeline (the docs/api.md recipe, on an unconditional
UNet2DModel) walks the same trajectory as diffpro's own sampler. tests/test_pipeline_parity.py checks the
float networks of the text pipelines; this checks the integer `.net` a user swaps in, called the way
DDPMPipeline calls it: `unet(x, t)` with a 0-d positional timestep."""

import pytest
import torch

import diffpro
from diffpro_cli.quant.layers import _TIMESTEPS
from diffpro_cli.sampling import SamplerConfig, sample, sample_generators

SUBSET = [249, 499, 749, 999]   # DDIM "trailing" with steps_offset 1 at 4 steps


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    path = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=unet, scheduler=_scheduler()).save_pretrained(path)
    return path


def _pipeline(net):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=net, scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():   # per-sample generators: the pipeline draws x_T exactly as diffpro's sampler does
        images = pipe(batch_size=2, num_inference_steps=4, generator=sample_generators(3, range(2)), output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _ours(model):
    x = sample(model, 2, SUBSET, SamplerConfig(method="ddim", clip_x0=False, cfg_scale=1.0), seed=3, batch_size=2, decode=False)
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_quantized_unet_in_ddpm_pipeline_matches_diffpros_sampler(ddpm_dir, tmp_path, act_mode):
    """Catches: the timestep pre-hook missing DDPMPipeline's positional 0-d timestep (static layers would run
    at the wrong calibrated step), or `.net` computing something other than what `diffpro sample` runs."""
    diffpro.quantize(str(ddpm_dir), tmp_path / "work", bits=8, act_mode=act_mode, calib_samples=1,
                     out_dir=tmp_path / "q", quiet=True)
    q = diffpro.load(tmp_path / "q")
    layer = next(m for m in q.net.modules() if getattr(m, "act_mode", None) == act_mode)
    seen = []   # the timesteps a quantized layer is told, inside the pipeline's calls
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(_TIMESTEPS.get().tolist()))
    ref = _pipeline(q.net)
    handle.remove()
    assert seen == [[t] for t in SUBSET[::-1]]
    ours = _ours(q)
    assert ref.shape == ours.shape == (2, 3, 8, 8)
    assert float((ref - ours).norm() / ref.norm()) < 1e-5
    float_images = _pipeline(diffpro.load(str(ddpm_dir)).net)
    assert not torch.equal(ref, float_images)      # the integer network really ran


def test_a_bf16_plan_computes_in_bf16_inside_the_pipeline(ddpm_dir, tmp_path):
    """Catches: set_compute_dtype (and a checkpoint planned for bf16) reaching only DiffusionModel.raw, so a
    pipeline calling `.net` ran the float math in fp32, not as the plan was priced (the output was bit
    identical to the fp32 run's). The network's own calls now run under the same autocast."""
    diffpro.quantize(str(ddpm_dir), tmp_path / "work", bits=8, calib_samples=1, out_dir=tmp_path / "q", quiet=True)
    fp32 = _pipeline(diffpro.load(tmp_path / "q").net)
    q = diffpro.load(tmp_path / "q", dtype="bfloat16")
    ours, piped = _ours(q), _pipeline(q.net)
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # measured: 1.0e-3 (bf16 rounding flips on the schedulers' ~1e-8 float differences) against 5.8e-2 for
    # the pipeline computing in fp32
    assert rel(piped, ours) < 5e-3 and rel(piped, ours) < rel(fp32, ours) / 10   # as diffpro's sampler runs it
    diffpro.set_compute_dtype(q, "float32")                           # and undoing it undoes it for the pipeline
    assert torch.equal(_pipeline(q.net), fp32)
