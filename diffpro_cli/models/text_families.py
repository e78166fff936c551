"""What each text-conditioned diffusers family needs beyond its config: conditioning fields, flow schedules
(fixed, dynamic FLUX-style, DPM-Solver `flow_prediction`), sample sizes and loader refusals.

Used by models.diffusers_dir.load_diffusers_dir; the call conventions themselves are models.base
(EMBEDDING_FORWARDS) and the settings a quantized reload must re-apply are net patches there.

- FLUX (FluxTransformer2DModel): packed 2×2 latents, img_ids/txt_ids and guidance built in base.flux_forward.
  The scheduler's `use_dynamic_shifting` shift depends on the image token count; for the model's fixed sample
  size diffpro computes mu as FluxPipeline does (`calculate_shift` with base/max_image_seq_len and
  base/max_shift from the scheduler config) and the scheduler's time shift, exponential
  e^mu/(e^mu + (1/σ − 1)) or linear mu/(mu + (1/σ − 1)), which is the fixed shift formula with shift = e^mu
  (resp. mu): the schedule is recorded as that fixed shift, plus the mu it came from. FLUX configs carry no
  sample size: the pipeline's default 1024² image (128² latents, FluxPipeline.default_sample_size), or a
  `sample_size` (latent pixels) written into transformer/config.json (diffusers ignores the key).
- SD3 (SD3Transformer2DModel): a fixed shift, or dynamic shifting resolved the same way for its patch count
  (StableDiffusion3Pipeline's defaults, max_shift 1.16).
- Sana (SanaTransformer2DModel): flow with a fixed shift, from a FlowMatchEulerDiscreteScheduler or the
  DPMSolverMultistepScheduler Sana ships (prediction_type "flow_prediction", use_flow_sigmas, flow_shift),
  which diffpro treats as the flow model it is (its own samplers: Euler, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

from diffpro_cli.errors import InputError

FLUX_DEFAULT_SAMPLE_SIZE = 128   # FluxPipeline.default_sample_size: 1024² images, 128² latents
FLUX_DEFAULT_GUIDANCE = 3.5      # FluxPipeline's default guidance_scale (guidance-distilled FLUX.1-dev)

# networks conditioned on text embeddings: kind, and {conditioning field: trailing shape} from the config
TEXT_MODELS = {
    "SD3Transformer2DModel": ("sd3", lambda c: {"encoder_hidden_states": [None, int(c["joint_attention_dim"])],
                                                "pooled_projections": [int(c["pooled_projection_dim"])]}),
    "PixArtTransformer2DModel": ("pixart", lambda c: {"encoder_hidden_states": [None, int(c["caption_channels"])]}),
    "UNet2DConditionModel": ("unet_cond", lambda c: {"encoder_hidden_states": [None, int(c["cross_attention_dim"])]}),
    "FluxTransformer2DModel": ("flux", lambda c: {"encoder_hidden_states": [None, int(c["joint_attention_dim"])],
                                                  "pooled_projections": [int(c["pooled_projection_dim"])]}),
    "SanaTransformer2DModel": ("sana", lambda c: {"encoder_hidden_states": [None, int(c["caption_channels"])]}),
}
FLOW_ONLY = ("SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel")   # trained as flow models


def is_flow_scheduler(config: dict | None) -> bool:
    """A flow-matching scheduler config: FlowMatch*, or a DPM-Solver-style one with prediction_type flow_prediction."""
    if not config:
        return False
    return str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction"


def calculate_shift(image_seq_len: int, config: dict, default_max_shift: float = 1.15) -> float:
    """FluxPipeline's mu for `image_seq_len` image tokens: linear between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler config (the pipelines' defaults 256/4096, 0.5/1.15; SD3's
    pipeline defaults max_shift to 1.16)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_schedule(config: dict, source: Path, image_seq_len: int | None = None, default_max_shift: float = 1.15) -> dict:
    """{"num_train_timesteps", "shift"} of a flow scheduler config (+ "dynamic": {mu, image_seq_len, time_shift_type}
    when the shift was resolved from use_dynamic_shifting for `image_seq_len` tokens)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("prediction_type") == "flow_prediction":   # DPMSolverMultistepScheduler & co. as Sana ships them
        if not config.get("use_flow_sigmas"):
            raise InputError(f"{source}: prediction_type flow_prediction without use_flow_sigmas is not a schedule diffpro knows; "
                             "use the pipeline's flow scheduler config (use_flow_sigmas, flow_shift)")
        if config.get("use_dynamic_shifting"):
            raise InputError(f"{source}: use_dynamic_shifting with flow sigmas is not supported; set a fixed flow_shift")
        return {"num_train_timesteps": n, "shift": float(config.get("flow_shift", 1.0))}
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal", "invert_sigmas",
                "stochastic_sampling"):
        if config.get(key):
            raise InputError(f"{source}: {key} is not supported; use the plain shifted flow-matching sigmas")
    if not config.get("use_dynamic_shifting"):
        return {"num_train_timesteps": n, "shift": float(config.get("shift", 1.0))}
    if image_seq_len is None:
        raise InputError(f"{source}: use_dynamic_shifting (resolution-dependent shift) is supported for FLUX and SD3 transformers only; "
                         "set a fixed shift in the scheduler config")
    mu = calculate_shift(image_seq_len, config, default_max_shift)
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise InputError(f"{source}: time_shift_type {kind!r} is not supported; use exponential or linear")
    shift = math.exp(mu) if kind == "exponential" else mu
    if not shift > 0:
        raise InputError(f"{source}: the dynamic shift for {image_seq_len} image tokens is {shift} (mu {mu}); check base/max_shift")
    return {"num_train_timesteps": n, "shift": shift,
            "dynamic": {"mu": mu, "image_seq_len": int(image_seq_len), "time_shift_type": kind}}


def sample_hw(class_name: str, cfg: dict, raw_config: dict, model_dir: Path) -> tuple[int, int]:
    """(H, W) of the latents the network denoises."""
    size = cfg.get("sample_size")
    if class_name == "FluxTransformer2DModel":
        size = raw_config.get("sample_size", FLUX_DEFAULT_SAMPLE_SIZE)
    if size is None:
        raise InputError(f"{model_dir / 'config.json'}: no sample_size; add the latent size the model was trained at")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if class_name == "FluxTransformer2DModel" and (h % 2 or w % 2):
        raise InputError(f"{model_dir / 'config.json'}: FLUX packs 2×2 latent patches, so sample_size {size} must be even; fix it")
    return int(h), int(w)


def check_family(class_name: str, cfg: dict, model_dir: Path, scheduler: dict | None, scheduler_file: Path) -> None:
    """Refuse what the family's loader does not cover, with the fix."""
    if class_name in FLOW_ONLY and not is_flow_scheduler(scheduler):
        raise InputError(f"{scheduler_file}: a {class_name} needs its flow-matching scheduler config "
                         "(FlowMatchEulerDiscreteScheduler, or flow_prediction with use_flow_sigmas); pass the whole pipeline directory")
    if class_name == "UNet2DConditionModel" and (cfg.get("class_embed_type") or cfg.get("num_class_embeds")):
        raise InputError(f"{model_dir}: class-conditioned UNet2DConditionModel is not supported; use a text-conditioned one")
    if class_name == "UNet2DConditionModel" and (cfg.get("addition_embed_type") not in (None, "text_time")
                                                 or cfg.get("encoder_hid_dim") or cfg.get("encoder_hid_dim_type")):
        # IF / Kandinsky / UnCLIP-style U-Nets take other inputs (projected text, image embeddings): the forward
        # failed at the first step with a shape error
        what = (f"addition_embed_type {cfg['addition_embed_type']!r}" if cfg.get("addition_embed_type") not in (None, "text_time")
                else f"encoder_hid_dim_type {cfg.get('encoder_hid_dim_type') or 'text_proj'!r}")
        raise InputError(f"{model_dir}: a UNet2DConditionModel with {what} is not supported; diffpro loads SD 1.x/2.x "
                         "(CLIP prompt embeddings) and SDXL (addition_embed_type text_time) U-Nets")
    if class_name == "FluxTransformer2DModel" and (int(cfg.get("patch_size", 1)) != 1 or int(cfg["in_channels"]) % 4):
        raise InputError(f"{model_dir}: FLUX with patch_size {cfg.get('patch_size')} / in_channels {cfg['in_channels']} is not "
                         "supported; diffpro packs 2×2 latent patches (patch_size 1, in_channels = 4 × latent channels)")
    out_channels = cfg.get("out_channels")
    if class_name in ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel") and \
            out_channels is not None and int(out_channels) != int(cfg["in_channels"]):
        # inpainting / InstructPix2Pix U-Nets and FLUX Fill/Depth/Canny read the latents with an image or mask
        # concatenated: sampled as plain latents they failed at the first step with a channel-count traceback
        raise InputError(f"{model_dir}: in_channels {cfg['in_channels']} but out_channels {out_channels}: a model that reads "
                         "extra image/mask channels beside the latents (inpainting, InstructPix2Pix, FLUX Fill/Depth/Canny) "
                         "is not supported; use the text-to-image model")
    if class_name == "SanaTransformer2DModel" and cfg.get("guidance_embeds"):
        raise InputError(f"{model_dir}: SANA-Sprint (guidance_embeds, TrigFlow/SCM scheduler) is not supported; use a SANA flow model")


def _pixart_size_conditions(cfg: dict) -> bool:
    """Whether a PixArt transformer takes resolution / aspect_ratio (its config's use_additional_conditions;
    unset means sample_size 128, PixArt-α 1024, as diffusers decides)."""
    given = cfg.get("use_additional_conditions")
    return bool(given) if given is not None else int(cfg.get("sample_size") or 0) == 128


def family_settings(class_name: str, cfg: dict, raw_config: dict, model_dir: Path, scheduler: dict | None,
                    scheduler_file: Path) -> dict:
    """Everything the loader records for a text-conditioned family: kind, sample (C, H, W), conditioning fields,
    and for flow models the schedule ("flow": flow_schedule's dict, with "timestep_scale") and extra net patches."""
    check_family(class_name, cfg, model_dir, scheduler, scheduler_file)
    kind, fields_of = TEXT_MODELS[class_name]
    h, w = sample_hw(class_name, cfg, raw_config, model_dir)
    channels = int(cfg["in_channels"])
    out = {"kind": kind, "fields": fields_of(cfg), "patches": {}}
    if class_name == "UNet2DConditionModel" and cfg.get("addition_embed_type") == "text_time":   # SDXL
        # add_embedding reads text_embeds ‖ the six time ids' sinusoidal embeddings: its input width fixes
        # the pooled width (without it a wrong width was a matmul traceback inside the U-Net)
        total, per_id = cfg.get("projection_class_embeddings_input_dim"), cfg.get("addition_time_embed_dim")
        width = int(total) - 6 * int(per_id) if total and per_id else None
        out["fields"] |= {"added_cond_kwargs.text_embeds": [width], "added_cond_kwargs.time_ids": [6]}
    if class_name == "PixArtTransformer2DModel" and _pixart_size_conditions(cfg):   # PixArt-α 1024
        # adaln_single embeds each image's pixel size and aspect ratio: without them the network stopped
        # with "'NoneType' object has no attribute 'flatten'"
        out["fields"] |= {"added_cond_kwargs.resolution": [2], "added_cond_kwargs.aspect_ratio": [1]}
    seq_len, scale, max_shift = None, 1.0, 1.15
    if class_name == "SD3Transformer2DModel":   # StableDiffusion3Pipeline's mu: patches of the latent, max_shift 1.16
        p = int(cfg.get("patch_size", 2))
        seq_len, max_shift = (h // p) * (w // p), 1.16
    elif class_name == "FluxTransformer2DModel":
        channels //= 4
        seq_len, scale = (h // 2) * (w // 2), 1.0 / int((scheduler or {}).get("num_train_timesteps", 1000))
        if cfg.get("guidance_embeds"):
            out["patches"]["default_guidance"] = float(raw_config.get("guidance_scale", FLUX_DEFAULT_GUIDANCE))
    elif class_name == "SanaTransformer2DModel":
        scale = float(cfg.get("timestep_scale", 1.0))
    out["sample_shape"] = (channels, h, w)
    if is_flow_scheduler(scheduler):
        out["flow"] = flow_schedule(scheduler, scheduler_file, seq_len, max_shift) | ({"timestep_scale": scale} if scale != 1.0 else {})
    return out
