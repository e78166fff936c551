"""Prompts → the `Conditioning` record, encoded with the pipeline's own text encoders.

`--prompts FILE` (one prompt a line, or a JSON list of strings) is the alternative to `--conditioning
FILE`: the prompts are encoded once, with the tokenizers and text encoders of the pipeline directory the
model was loaded from, through the diffusers pipeline class's own `encode_prompt` (the pipeline is
loaded with its denoiser, VAE and safety components left out), in float32 on the run's device. The
result is exactly the record that a `--conditioning` file holding the same tensors gives
(`conditioning_from_tensors`), so every stage downstream is unchanged. The text encoders are never
quantized and never join the checkpoint.

Families (by the denoiser's class; the pipeline's `__call__` defaults are used where the pipeline
would use them, e.g. `max_sequence_length`, Sana's complex human instruction, FLUX's guidance):
  UNet2DConditionModel      SD 1.x/2.x: CLIP → prompt_embeds
                            SDXL (text_encoder_2): both CLIPs → prompt_embeds, pooled → text_embeds,
                            time_ids = (H, W, 0, 0, H, W) at the model's pixel size; an empty negative
                            prompt is zeroed where the pipeline's force_zeros_for_empty_prompt says so
  SD3Transformer2DModel     2×CLIP + T5 → prompt_embeds, pooled_projections
  PixArtTransformer2DModel  T5 → prompt_embeds + attention mask (clean_caption off: it needs bs4/ftfy);
                            PixArt-α 1024 (sample_size 128) also gets resolution / aspect_ratio
  FluxTransformer2DModel    CLIP pooled + T5 → prompt_embeds, pooled_projections (guidance: the loader's
                            default, FluxPipeline's 3.5); the negative prompt is the true-CFG one
  SanaTransformer2DModel    Gemma → prompt_embeds + attention mask
The built-in text model (config text_encoder = "builtin-words") encodes with its own tiny embedding.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.conditioning import Conditioning, check_fits, conditioning_from_tensors

EXTRA_HINT = "pip install 'diffpro[text]'"
DENOISER_CLASSES = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "PixArtTransformer2DModel": "pixart",
                    "FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana"}
# the diffusers pipeline class of each family, where model_index.json names none that has encode_prompt
DEFAULT_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
                     "pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline", "sana": "SanaPipeline"}
# text components each family cannot encode without
REQUIRED = {"sd": ("tokenizer", "text_encoder"), "sdxl": ("tokenizer_2", "text_encoder_2"),
            "sd3": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"), "pixart": ("tokenizer", "text_encoder"),
            "flux": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"), "sana": ("tokenizer", "text_encoder")}
TEXT_PREFIXES = ("text_encoder", "tokenizer")


# ---------------------------------------------------------------------------------------------
# The prompts file
# ---------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: a JSON list of strings (when the file starts with '['), else one prompt a
    line (blank lines skipped, surrounding whitespace kept off)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file; give a text file with one prompt a line or a JSON list of strings")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the prompts as UTF-8, one a line") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); give a JSON list of strings or one prompt a line") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{path}: the JSON must be a list of strings (prompts); got {type(prompts).__name__} of other values")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path}: holds no prompts; give one prompt a line or a JSON list of strings")
    return prompts


# ---------------------------------------------------------------------------------------------
# Which pipeline, which family
# ---------------------------------------------------------------------------------------------


def _no_encoder(where, why: str) -> InputError:
    return InputError(f"{where}: {why}; encode the prompts elsewhere and pass the embeddings with --conditioning FILE instead of --prompts")


def pipeline_dir(model) -> Path:
    """The diffusers pipeline folder (model_index.json) the model (or the model a quantized checkpoint was
    made from) was loaded from."""
    source = (model.config or {}).get("source")
    if model.conditioning != "embeddings":
        raise UsageError(f"{model.spec}: takes {'class labels' if model.num_classes is not None else 'no conditioning'}, "
                         "not prompts; drop --prompts")
    if source and model.spec != source and not Path(source).exists():   # a checkpoint whose pipeline was moved
        raise InputError(f"{model.spec}: its text encoders are in the pipeline it was quantized from, {source}, which is no "
                         "longer there; put the pipeline back, or pass the embeddings with --conditioning FILE")
    if not source or not (Path(source) / "model_index.json").is_file():
        raise _no_encoder(source or model.spec, "is not a diffusers pipeline directory (no model_index.json), so it has no text encoders")
    return Path(source)


def _family(model, index: dict) -> str:
    cls = (model.config or {}).get("class")
    kind = DENOISER_CLASSES.get(cls)
    if kind is None:
        raise _no_encoder(model.spec, f"diffpro does not encode prompts for {cls or 'this model'}")
    if kind == "unet":
        return "sdxl" if (index.get("text_encoder_2") or [None])[0] else "sd"
    return kind


def _present(index: dict, folder: Path) -> list[str]:
    """Text components that model_index.json lists (not null) and that exist on disk."""
    return [k for k, v in index.items() if k.startswith(TEXT_PREFIXES) and isinstance(v, list) and v and v[0]
            and (folder / k).is_dir()]


def _require_text_extra() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError(f"--prompts needs the text encoders' library (transformers), which is not installed; "
                         f"run {EXTRA_HINT}, or pass precomputed embeddings with --conditioning FILE") from None


@contextlib.contextmanager
def _quiet_libraries():
    """No progress bars or info/warning logs from diffusers/transformers while the text encoders load."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load_text_pipeline(folder: Path, index: dict, family: str, device: str = "cpu"):
    """The pipeline object with only its tokenizers, text encoders and scheduler loaded, text encoders in
    float32 on `device` and in eval mode."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "encode_prompt"):
        cls = getattr(diffusers, DEFAULT_PIPELINES[family])
    keep = set(_present(index, folder)) | ({"scheduler"} if (folder / "scheduler").is_dir() else set())
    skip = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and k not in keep}
    try:
        with _quiet_libraries():
            pipe = cls.from_pretrained(folder, **skip)
    except Exception as exc:  # noqa: BLE001 (transformers/diffusers raise OSError, ValueError, KeyError ... for broken folders)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(f"{folder}: the pipeline's text encoders do not load ({first}); re-download them, "
                         "or pass precomputed embeddings with --conditioning FILE") from None
    for key in _present(index, folder):
        component = getattr(pipe, key, None)
        if isinstance(component, torch.nn.Module):
            component.to(device=device, dtype=torch.float32).eval()
    return pipe


def _call_default(pipe, name: str, fallback=None):
    """The default of the pipeline's own `__call__` argument `name` (what it would use when not given)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def _pixel_size(folder: Path, model) -> tuple[int, int]:
    """The image size the pipeline generates at: latent size × 2^(VAE levels − 1) (8 without a VAE config)."""
    scale = 8
    vae = folder / "vae" / "config.json"
    if vae.is_file():
        scale = 2 ** (len(json.loads(vae.read_text()).get("block_out_channels", [0] * 4)) - 1)
    return int(model.sample_shape[1]) * scale, int(model.sample_shape[2]) * scale


# ---------------------------------------------------------------------------------------------
# Per family: the pipeline's encode_prompt → named tensors (conditioning file names)
# ---------------------------------------------------------------------------------------------


def _sd(pipe, model, folder, prompts, negative, device):
    pe, npe = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[negative] * len(prompts))
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


def _sdxl(pipe, model, folder, prompts, negative, device):
    # None (not "") lets the pipeline zero an empty negative prompt (force_zeros_for_empty_prompt), as its __call__ does
    neg = None if negative == "" else [negative] * len(prompts)
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=neg)
    h, w = _pixel_size(folder, model)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=pe.dtype)
    cfg = model.config.get("config") or {}
    want, have = cfg.get("projection_class_embeddings_input_dim"), pooled.shape[-1] + 6 * int(cfg.get("addition_time_embed_dim") or 0)
    if want is not None and int(want) != have:    # the pipeline's own _get_add_time_ids check
        raise InputError(f"{folder}: pooled text embeddings ({pooled.shape[-1]}) + 6 time ids give {have} added-condition "
                         f"features but the U-Net expects {want}; use the text_encoder_2 this U-Net was trained with")
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe,
            "added_cond_kwargs.text_embeds": pooled, "negative_added_cond_kwargs.text_embeds": npooled,
            "added_cond_kwargs.time_ids": time_ids, "negative_added_cond_kwargs.time_ids": time_ids.clone()}


def _sd3(pipe, model, folder, prompts, negative, device):
    if pipe.text_encoder_3 is None:    # without T5 the pipeline pads with zeros sized by its transformer's config
        pipe.transformer = model.net
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
        negative_prompt=negative, max_sequence_length=_call_default(pipe, "max_sequence_length", 256))
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": npooled}


def _pixart(pipe, model, folder, prompts, negative, device):
    pe, mask, npe, nmask = pipe.encode_prompt(prompts, True, negative_prompt=negative, device=device, clean_caption=False,
                                              max_sequence_length=_call_default(pipe, "max_sequence_length", 120))
    out = {"prompt_embeds": pe, "prompt_attention_mask": mask, "negative_prompt_embeds": npe,
           "negative_prompt_attention_mask": nmask}
    cfg = model.config.get("config") or {}
    extra = cfg.get("use_additional_conditions")
    if extra if extra is not None else int(cfg.get("sample_size") or 0) == 128:   # PixArt-α 1024: size conditions
        h, w = _pixel_size(folder, model)
        for prefix in ("", "negative_"):
            out[f"{prefix}added_cond_kwargs.resolution"] = torch.tensor([[h, w]] * len(prompts), dtype=pe.dtype)
            out[f"{prefix}added_cond_kwargs.aspect_ratio"] = torch.tensor([[h / w]] * len(prompts), dtype=pe.dtype)
    return out


def _flux(pipe, model, folder, prompts, negative, device):
    length = _call_default(pipe, "max_sequence_length", 512)
    pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=length)
    npe, npooled, _ = pipe.encode_prompt(prompt=[negative] * len(prompts), prompt_2=None, device=device, max_sequence_length=length)
    # guidance (guidance-distilled FLUX.1-dev) is left to the loader's recorded default (FluxPipeline's 3.5)
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": npe,
            "negative_pooled_prompt_embeds": npooled}


def _sana(pipe, model, folder, prompts, negative, device):
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompts, True, negative_prompt=negative, device=device, clean_caption=False,
        max_sequence_length=_call_default(pipe, "max_sequence_length", 300),
        complex_human_instruction=_call_default(pipe, "complex_human_instruction"))
    return {"prompt_embeds": pe, "prompt_attention_mask": mask, "negative_prompt_embeds": npe,
            "negative_prompt_attention_mask": nmask}


ENCODERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "pixart": _pixart, "flux": _flux, "sana": _sana}


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def prompt_tensors(model, prompts: list[str], negative_prompt: str = "", *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors a conditioning file of these prompts would hold (float32 / masks as returned, on the CPU)."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UsageError("prompts must be a non-empty list of strings")
    if (model.config or {}).get("text_encoder") == "builtin-words":
        from diffpro_cli.models.builtin_text import encode_prompts as builtin_encode

        tensors = dict(builtin_encode(list(prompts)))
        tensors.update({f"negative_{k}": v for k, v in builtin_encode([negative_prompt] * len(prompts)).items()
                        if k != "guidance"})
    else:
        folder = pipeline_dir(model)
        from diffpro_cli.artifacts import read_json

        index = read_json(folder / "model_index.json", missing="pass the whole pipeline directory", fix="re-download it")
        family = _family(model, index)
        present = _present(index, folder)
        missing = [k for k in REQUIRED[family] if k not in present]
        if missing:
            raise _no_encoder(folder, f"the pipeline has no {', '.join(k + '/' for k in missing)}")
        _require_text_extra()
        pipe = load_text_pipeline(folder, index, family, device)
        try:
            with torch.no_grad():
                tensors = ENCODERS[family](pipe, model, folder, list(prompts), negative_prompt, device)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:   # tokenizer/encoder mismatches inside the pipeline
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise _no_encoder(folder, f"its text encoders failed on the prompts ({first})") from None
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in tensors.items()}


def encode_prompts(model, prompts: list[str], negative_prompt: str = "", *, device: str = "cpu",
                   source: str | Path | None = None) -> Conditioning:
    """The Conditioning of `prompts` (with `negative_prompt` as the unconditional counterpart for CFG),
    encoded with the text encoders of the pipeline `model` was loaded from; shapes checked against the
    network (`source` names the prompts in errors)."""
    label = f"{source or 'prompts'} (encoded with {(model.config or {}).get('source') or model.spec})"
    cond = conditioning_from_tensors(prompt_tensors(model, prompts, negative_prompt, device=device), label)
    try:
        check_fits(cond, model.conditioning_fields, label)
    except InputError as exc:     # the pipeline's own text encoders do not fit its denoiser
        raise InputError(f"{exc.message.split('; ')[0]}; the pipeline's text encoders do not belong to this network: "
                         "use the ones it was trained with, or pass embeddings with --conditioning FILE") from None
    return cond


def encode_prompt_file(model, path: str | Path, negative_prompt: str = "", *, device: str = "cpu") -> Conditioning:
    """encode_prompts on the prompts of a file (read_prompts)."""
    return encode_prompts(model, read_prompts(path), negative_prompt, device=device, source=path)
