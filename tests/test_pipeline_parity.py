"""diffpro's float samplers against the diffusers pipelines they mirror (issue #21, "Done when" (a)).

Each of the five text-conditioned classes is built tiny and random in process (save_pretrained into a temp
dir, no downloads), loaded by diffpro from that directory, and sampled by diffpro and by the diffusers
pipeline class for it (text encoders, tokenizers and VAE None: the pipeline gets `prompt_embeds` & co.
directly) with the same prompt embeddings, the same initial latents (diffpro's seeded per-sample noise,
handed to the pipeline as `latents`, so the pipeline's own generator draws nothing), the same steps and
`output_type="latent"`. They agree to ≤ 1e-4 relative (measured 1.3e-7 … 4.6e-7: float32 rounding).

Settings the two sides must share, and why:
  * DDIM: the scheduler's `clip_sample=False` (diffusers' default True clips x0 but keeps the raw ε; diffpro's
    clip_x0 recomputes ε from the clipped x0, ADM's convention) with diffpro's clip_x0=False;
    `set_alpha_to_one=True` (diffpro's last step goes to ᾱ = 1); "trailing" spacing, so the pipeline's steps are
    999, 749, 499, 249 — the subset diffpro walks.
  * Flow: the pipelines take `sigmas=[(i + 1)/N for the subset's indices i]` (FluxPipeline's own default,
    linspace(1, 1/K, K), is this for K | N); both end at σ = 0.
  * SANA ships DPMSolverMultistepScheduler(flow_prediction): diffpro reads it as the flow model it is and samples
    with its Euler sampler, so the reference is SanaPipeline with FlowMatchEulerDiscreteScheduler(shift=flow_shift).
"""

from __future__ import annotations

import pytest
import torch
from test_text_loaders import _embeds, _pipeline, _tiny_flux, _tiny_sana, _tiny_sd3, flux_pipeline

from diffpro_cli.models.base import flux_pack, flux_unpack
from diffpro_cli.models.conditioning import conditioning_from_tensors
from diffpro_cli.models.diffusers_dir import load_diffusers_dir
from diffpro_cli.sampling import SamplerConfig, sample, sample_generators

SUBSET = [249, 499, 749, 999]
SIGMAS = [(i + 1) / 1000 for i in SUBSET[::-1]]


def _tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                    cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2).eval()


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4).eval()


def _ddim(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


def _with_negative(emb: dict, seed: int = 9) -> dict:
    """emb plus random negative_* counterparts (the unconditional embeddings of classifier-free guidance)."""
    g = torch.Generator().manual_seed(seed)
    return emb | {f"negative_{k}": (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in emb.items()}


def _initial(model, n=2, seed=3):
    return torch.stack([torch.randn(model.sample_shape, generator=g) for g in sample_generators(seed, range(n))])


def _ours(model, emb, cfg_scale, method):
    model.with_conditioning(conditioning_from_tensors(emb))
    return sample(model, 2, SUBSET, SamplerConfig(method=method, clip_x0=False, cfg_scale=cfg_scale), seed=3, batch_size=2,
                  decode=False)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- the five classes: a tiny pipeline directory and prompt embeddings for it -------------------------------


def _masked(emb: dict, neg_mask) -> dict:
    out = _with_negative(emb | {"prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])})
    return out | {"negative_prompt_attention_mask": torch.tensor(neg_mask)}


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)


def build(name: str, tmp_path):
    """(pipeline directory, network, embeddings with negative_* counterparts) of class `name`."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if name == "pixart":
        net = _tiny_pixart()
        return (_pipeline(tmp_path, "transformer", net, _ddim(), cls="PixArtSigmaPipeline"), net,
                _masked(_embeds(2, 5, 12), [[1] * 5] * 2))
    if name == "unet":
        net = _tiny_unet()
        return _pipeline(tmp_path, "unet", net, _ddim("v_prediction"), cls="StableDiffusionPipeline"), net, _with_negative(_embeds(2, 5, 12))
    if name == "sd3":
        net = _tiny_sd3()
        path = _pipeline(tmp_path, "transformer", net, FlowMatchEulerDiscreteScheduler(shift=3.0), cls="StableDiffusion3Pipeline")
        return path, net, _with_negative(_embeds(2, 5, 12, pooled=10))
    if name == "flux":
        net = _tiny_flux()
        return flux_pipeline(tmp_path, net, _flux_scheduler()), net, _with_negative(_embeds(2, 5, 12, pooled=10))
    net = _tiny_sana()   # SANA ships DPM-Solver with flow sigmas
    shipped = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return (_pipeline(tmp_path, "transformer", net, shipped, cls="SanaPipeline"), net,
            _masked(_embeds(2, 5, 12), [[1, 1, 0, 0, 0]] * 2))


CLASSES = ("pixart", "unet", "sd3", "flux", "sana")


# --- (a) one parity case per class: (diffpro's samples, the pipeline's latents) ------------------------------


def pixart_case(tmp_path):
    """DDIM / epsilon, classifier-free guidance 4.5 with negative embeddings and attention masks."""
    from diffusers import PixArtSigmaPipeline

    path, net, emb = build("pixart", tmp_path)
    model = load_diffusers_dir(path)
    x = _initial(model)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=_ddim())
    ref = pipe(prompt_embeds=emb["prompt_embeds"], prompt_attention_mask=emb["prompt_attention_mask"],
               negative_prompt=None, negative_prompt_embeds=emb["negative_prompt_embeds"],
               negative_prompt_attention_mask=emb["negative_prompt_attention_mask"],
               guidance_scale=4.5, num_inference_steps=4, height=64, width=64, latents=x, output_type="latent",
               use_resolution_binning=False).images
    return _ours(model, emb, 4.5, "ddim"), ref


def unet_case(tmp_path):
    """DDIM / v-prediction (SD 2.1-style UNet2DConditionModel), guidance 1 (diffpro guides the ε-equivalent, the
    pipeline v: the same affine combination, checked by the PixArt and SD3 cases with guidance)."""
    from diffusers import StableDiffusionPipeline

    path, net, emb = build("unet", tmp_path)
    model = load_diffusers_dir(path)
    assert model.prediction_type == "v_prediction"
    x = _initial(model)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=net, scheduler=_ddim("v_prediction"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = pipe(prompt_embeds=emb["prompt_embeds"], guidance_scale=1.0, num_inference_steps=4, height=64, width=64, latents=x,
               output_type="latent").images
    return _ours(model, emb, 1.0, "ddim"), ref


def sd3_case(tmp_path):
    """Flow Euler, fixed shift 3, guidance 3 with negative (pooled) embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path, net, emb = build("sd3", tmp_path)
    model = load_diffusers_dir(path)
    x = _initial(model)
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    ref = pipe(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
               negative_prompt_embeds=emb["negative_prompt_embeds"], negative_pooled_prompt_embeds=emb["negative_pooled_prompt_embeds"],
               guidance_scale=3.0, sigmas=SIGMAS, height=64, width=64, latents=x, output_type="latent").images
    return _ours(model, emb, 3.0, "euler"), ref


def flux_case(tmp_path):
    """Flow Euler with FLUX's dynamic shift (mu for the 16 packed tokens), guidance embedding 3.5 (the recorded
    default: the conditioning carries none), packed latents; no true CFG (FLUX.1-dev is guidance-distilled)."""
    from diffusers import FluxPipeline

    path, net, emb = build("flux", tmp_path)
    model = load_diffusers_dir(path)
    x = _initial(model)
    pipe = FluxPipeline(scheduler=_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=net)
    ref = pipe(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"], guidance_scale=3.5,
               num_inference_steps=4, height=64, width=64, latents=flux_pack(x), output_type="latent").images
    return _ours(model, emb, 1.0, "euler"), flux_unpack(ref, 8, 8)


def sana_case(tmp_path):
    """Flow Euler, shift 3 from SANA's DPMSolverMultistepScheduler(flow_prediction) config, guidance 4.5 with masks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    path, net, emb = build("sana", tmp_path)
    model = load_diffusers_dir(path)
    x = _initial(model)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref = pipe(prompt_embeds=emb["prompt_embeds"], prompt_attention_mask=emb["prompt_attention_mask"],
               negative_prompt=None, negative_prompt_embeds=emb["negative_prompt_embeds"],
               negative_prompt_attention_mask=emb["negative_prompt_attention_mask"],
               guidance_scale=4.5, sigmas=SIGMAS, height=256, width=256, latents=x, output_type="latent",
               use_resolution_binning=False).images
    return _ours(model, emb, 4.5, "euler"), ref


CASES = {"pixart-ddim-eps": pixart_case, "unet-ddim-v": unet_case, "sd3-flow": sd3_case, "flux-flow": flux_case,
         "sana-flow": sana_case}


@pytest.mark.parametrize("name", list(CASES))
def test_float_sampler_matches_the_diffusers_pipeline(tmp_path, name):
    """Catches any divergence between diffpro's loader + sampler and the pipeline: a wrong schedule (betas, shift, mu),
    timestep units (σ·N vs σ, FLUX's /1000, SANA's timestep_scale), v/flow conversions, CFG order or masks,
    FLUX packing/ids/guidance, the final step (ᾱ = 1 / σ = 0)."""
    with torch.no_grad():
        ours, ref = CASES[name](tmp_path)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) <= 1e-4, _rel(ours, ref)
    assert ref.abs().mean() > 0.1    # a real trajectory, not zeros on both sides


# --- (b) W8 checkpoints reload exactly in a fresh process; the whole pipeline runs on each class -------------

RELOAD_SCRIPT = """
import sys, torch
from diffpro_cli.loading import load_model
torch.set_num_threads(1)
q, cond, inputs, out = sys.argv[1:5]
m = load_model(q).with_conditioning(cond)
x, t = torch.load(inputs, weights_only=True)
with torch.no_grad():
    torch.save(m.raw(x, t, m.conditioning_set), out)
"""


def _in_memory_w8(path):
    """What `diffpro quantize --bits 8` stores, built in place on a fresh float load."""
    from diffpro_cli.checkpoint import embedding_tables, set_submodule
    from diffpro_cli.quant import formats
    from diffpro_cli.quant.layers import Int8Embedding
    from diffpro_cli.stages.quantize import apply_plan, uniform_plan

    model = load_diffusers_dir(path)
    apply_plan(model, uniform_plan(model, 8))
    for name in embedding_tables(model.net):
        set_submodule(model.net, name, Int8Embedding(*formats.quantize_weight(model.net.get_submodule(name).weight, 8)))
    return model


@pytest.mark.parametrize("name", CLASSES)
def test_w8_reload_is_exact_and_the_pipeline_runs(tmp_path, cli, name):
    """Catches: a setting the loader applies that a checkpoint reload misses (flow_timesteps shift/timestep_scale,
    FLUX's default_guidance, the kind's call convention, decoder), which would make the reloaded network differ
    from the one that was planned; and any stage that cannot take a text-conditioned model of this class."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    path, _, emb = build(name, tmp_path / "model")
    cond = tmp_path / "prompts.safetensors"
    save_file({k: v.contiguous() for k, v in emb.items()}, str(cond))

    code, _, err = cli("quantize", path, "--bits", "8", "--conditioning", cond, "--out", tmp_path / "w8", "-w", tmp_path / "wq", "--quiet")
    assert code == 0, err
    model = _in_memory_w8(path).with_conditioning(cond)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, *model.sample_shape, generator=g), torch.tensor([999, 250])
    torch.save((x, t), tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "w8"), str(cond), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "fresh.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        memory = model.raw(x, t, model.conditioning_set)
        float_out = load_diffusers_dir(path).with_conditioning(cond).raw(x, t, model.conditioning_set)
    assert not torch.equal(memory, float_out)          # W8 really quantized something
    assert torch.equal(torch.load(tmp_path / "fresh.pt", weights_only=True), memory)

    work = tmp_path / "work"
    (tmp_path / "run.toml").write_text(f"""model = "{path}"
workdir = "{work}"
conditioning = "{cond}"
stages = ["profile", "score", "prune", "allocate", "quantize"]
[profile]
samples = 2
timesteps = "999:0:500"
batch = 2
[score]
figures = false
[prune]
steps = 3
reference_steps = 6
n = 2
batch = 2
clip_x0 = false
[allocate]
budget = "avg-bits=8"
repeats = 1
batch = 2
""")
    code, _, err = cli("run", tmp_path / "run.toml", "--quiet")
    assert code == 0, err
    code, _, err = cli("sample", work / "quantized", "--conditioning", cond, "--timesteps", work / "timesteps.json", "--n", "2",
                         "--batch", "2", "--out", tmp_path / "grid.png", "--json", "--quiet")
    assert code == 0, err
    assert (tmp_path / "grid.png").is_file()
