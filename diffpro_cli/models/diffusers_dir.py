"""Diffusers directories: a model folder (config.json + weights) or a pipeline folder (model_index.json).

Supported networks: DiTTransformer2DModel (also the legacy `Transformer2DModel` name with
norm_type ada_norm_zero, as in facebook/DiT-XL-2-256) and UNet2DModel (class labels), and the
text-conditioned SD3Transformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel,
FluxTransformer2DModel and SanaTransformer2DModel (prompt embeddings through a `Conditioning`; text
encoders are not loaded; family specifics in models.text_families). A pipeline is DiTPipeline-like
(transformer/ + scheduler/ + optional vae/) or DDPMPipeline/StableDiffusionPipeline-like (unet/ + scheduler/).

- Schedule: from scheduler/scheduler_config.json (num_train_timesteps, beta_start, beta_end,
  beta_schedule linear | scaled_linear | squaredcos_cap_v2, or trained_betas; prediction_type epsilon or
  v_prediction) when present, else the linear 1000-step DDPM schedule. A FlowMatchEulerDiscreteScheduler
  config (or a flow_prediction DPM-Solver config, as SANA ships) makes a flow-matching model with its
  `shift` (FLUX/SD3 dynamic shifting: resolved for the model's sample size, text_families.flow_schedule).
- Latent models: with a vae/ (AutoencoderKL or AutoencoderDC), decode(z) = vae.decode(z / scaling_factor
  + shift_factor).sample (shift_factor 0 where the VAE config has none; FLUX and SD3 VAEs have one),
  recorded as config["decode"] (see `build_decoder`) so a quantized checkpoint decodes the same way.
  A DiT without a VAE decodes as the identity (samples stay latents).
- Classes: DiT → num_embeds_ada_norm (the extra CFG row is the null label). A U-Net with
  num_class_embeds=K → K-1 classes: the last class index is treated as the null label.

Weights are read here (not via from_pretrained) so every failure is one clear line and the exact
files are hashed: diffusion_pytorch_model.safetensors (or a sharded .index.json), else the .bin via
torch.load(weights_only=True). Pre-0.14 attention key names (query/key/value/proj_attn) are renamed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from pathlib import Path

import torch

from diffpro_cli.errors import InputError, TrustError
from diffpro_cli.models.base import (EMBEDDING_FORWARDS, DiffusionModel, apply_net_patches, flow_alphas_cumprod, flow_sigmas,
                                     linear_alphas_cumprod)
from diffpro_cli.models.text_families import TEXT_MODELS, family_settings, flow_schedule, is_flow_scheduler

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
_OLD_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_WRAPPER_KEYS = ("ema", "state_dict", "model", "module")


# ---------------------------------------------------------------------------------------------
# Weight files (shared with original_dit.py and custom.py)
# ---------------------------------------------------------------------------------------------


def read_weights(path: str | Path):
    """The object stored in a .safetensors or torch pickle file, loaded without running any code.

    Torch pickles load with weights_only=True (argparse.Namespace, as in DiT training checkpoints, is
    allowed). Pickles that need other classes are refused with a TrustError: diffpro never unpickles
    arbitrary code, even with --trust-code; re-save such files as a plain state dict.
    """
    from diffpro_cli.artifacts import load_safetensors

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path")
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError ... for bad files
        text = str(exc)
        found = re.findall(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and found:   # without a GLOBAL it is a corrupt file, not code
            what = f" (it pickles {found[0]})"
            raise TrustError(f"{path}: not a plain state dict{what} and diffpro does not unpickle code; "
                             "re-save it with torch.save(model.state_dict(), ...) or as .safetensors") from None
        first = text.splitlines()[0].split(". ")[0][:100] if text else type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first}); re-create or re-download it") from None


def extract_state_dict(obj, path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(name → float tensor, wrapper key used) from a loaded object; unwraps {"ema"/"state_dict"/"model": ...}."""
    wrapper = None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj, wrapper = obj[key], key
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "dict without (only) tensors"
        raise InputError(f"{path}: holds a {kind}, not a state dict (name → tensor); save model.state_dict() instead")
    state = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DistributedDataParallel prefix
        state[k] = v.float() if v.is_floating_point() else v
    return state, wrapper


def load_into(net: torch.nn.Module, state: dict, source: str | Path) -> None:
    """Strictly load `state` into `net` (tensors are assigned, not copied); a mismatch is an InputError."""
    expected = net.state_dict()
    _rename_old_attention_keys(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{source}: weights do not match the architecture: {'; '.join(parts)}; check that config and weights belong together")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise InputError(f"{source}: {len(bad)} tensors have the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(expected[k].shape)}); check that config and weights belong together")
    net.load_state_dict(state, strict=True, assign=True)


def _rename_old_attention_keys(state: dict, expected: dict) -> None:
    for k in list(state):
        if k in expected:
            continue
        for old, new in _OLD_ATTENTION_NAMES.items():
            renamed = k.replace(old, new)
            if renamed != k and renamed in expected:
                state[renamed] = state.pop(k)
                break


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    from diffpro_cli.artifacts import read_json

    obj = read_json(path, missing="pass a complete diffusers model or pipeline directory", fix="re-create or re-download it")
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object; re-create or re-download it")
    return obj


VAES = ("AutoencoderKL", "AutoencoderDC")


def _model_classes() -> dict:
    import diffusers

    return {name: getattr(diffusers, name) for name in (*SUPPORTED, *VAES)}


SUPPORTED = ("DiTTransformer2DModel", "UNet2DModel", *TEXT_MODELS)


def _weights_files(folder: Path) -> list[Path]:
    for name in WEIGHT_NAMES:
        p = folder / name
        if p.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(_read_json(p).get("weight_map", {}).values()))
                if not shards:
                    raise InputError(f"{p}: sharded index has no weight_map; re-download the model")
                return [folder / s for s in shards]
            return [p]
    raise InputError(f"{folder}: no weights file (expected {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[2]}); re-download or re-save the model")


def load_module_dir(folder: Path, allowed: tuple[str, ...]) -> tuple[torch.nn.Module, str]:
    """Build the diffusers class named in folder/config.json and load its weights; (net in eval mode, class name)."""
    from diffusers.models.modeling_utils import no_init_weights

    config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero":
        name = "DiTTransformer2DModel"  # the legacy name facebook/DiT-* configs use
    elif name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        name = "PixArtTransformer2DModel"  # the legacy name of PixArt-α/Σ uploads
    if name not in allowed:
        raise InputError(f"{folder}: model class {name!r} is not supported; pass a directory of one of the classes diffpro loads: "
                         f"{', '.join(allowed)}")
    cls = _model_classes()[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in accepted and k != "self"}
    files = _weights_files(folder)
    try:
        with no_init_weights():  # every parameter is overwritten by the strict load below
            net = cls(**kwargs)
    except Exception as exc:  # diffusers validates configs with ValueError / NotImplementedError / TypeError
        raise InputError(f"{folder / 'config.json'}: {name} rejects this config ({str(exc).splitlines()[0][:100]}); fix or re-download it") from None
    state = {}
    for f in files:
        state.update(extract_state_dict(read_weights(f), f)[0])
    load_into(net, state, files[0] if len(files) == 1 else folder)
    return net.eval(), name


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def alphas_cumprod_from_scheduler(config: dict, source: Path) -> torch.Tensor:
    """alphas_cumprod (float64) for a diffusers DDPM-family scheduler config (epsilon or v_prediction)."""
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise InputError(f"{source}: prediction_type {config['prediction_type']!r} is not supported; diffpro needs epsilon or v_prediction")
    if config.get("rescale_betas_zero_snr"):
        raise InputError(f"{source}: rescale_betas_zero_snr is not supported; use a model trained with a standard schedule")
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "linear":
        return linear_alphas_cumprod(n, start, end)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        raise InputError(f"{source}: beta_schedule {schedule!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2")
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def _vae_decoder(vae, scaling_factor: float, shift_factor: float = 0.0):
    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(z / scaling_factor + shift_factor if shift_factor else z / scaling_factor).sample

    return decode


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def build_decoder(record: dict | None):
    """decode(x) for a config["decode"] record: None / {"type": "identity"}, or {"type": "vae", "path":
    absolute VAE folder, "scaling_factor": s, "shift_factor": f (optional, 0)}. The loader and load_quantized
    both build it here."""
    kind = (record or {}).get("type", "identity")
    if kind == "identity":
        return _identity
    if kind == "vae":
        vae, _ = load_module_dir(Path(record["path"]), VAES)
        return _vae_decoder(vae, float(record["scaling_factor"]), float(record.get("shift_factor") or 0.0))
    raise InputError(f"decoder type {kind!r} is unknown to this diffpro; upgrade diffpro or re-quantize from the original model")


def load_diffusers_dir(path: str | Path) -> DiffusionModel:
    """A DiffusionModel from a diffusers model or pipeline directory (see module docstring)."""
    from diffpro_cli.artifacts import input_record
    from diffpro_cli.models.base import dit_forward, unet_forward

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such directory; pass a diffusers model or pipeline directory")
    index = None
    if (path / "config.json").is_file():
        model_dir, scheduler_file, vae_dir = path, path / "scheduler_config.json", None
    elif (path / "model_index.json").is_file() or (path / "transformer").is_dir() or (path / "unet").is_dir():
        index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
        if index.get("requires_aesthetics_score"):   # its U-Net reads 5 time ids (aesthetic score), not 6
            raise InputError(f"{path}: is an SDXL refiner (img2img, aesthetic-score time ids), which diffpro does not load; "
                             "use the SDXL base pipeline")
        sub = next((s for s in ("transformer", "unet") if (path / s / "config.json").is_file()), None)
        if sub is None:
            raise InputError(f"{path}: pipeline has no transformer/config.json or unet/config.json; diffpro loads DiT, DDPM, PixArt, SD3, FLUX, SANA and Stable Diffusion pipelines")
        model_dir, scheduler_file = path / sub, path / "scheduler" / "scheduler_config.json"
        vae_dir = path / "vae" if (path / "vae" / "config.json").is_file() else None
    else:
        raise InputError(f"{path}: no config.json or model_index.json; pass a diffusers model or pipeline directory")

    net, class_name = load_module_dir(model_dir, SUPPORTED)
    cfg = {k: v for k, v in net.config.items() if not k.startswith("_")}
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
    family = None
    if class_name in TEXT_MODELS:
        family = family_settings(class_name, cfg, _read_json(model_dir / "config.json"), model_dir, scheduler, scheduler_file)
    extra: dict = {}
    if is_flow_scheduler(scheduler):
        flow = family["flow"] if family else flow_schedule(scheduler, scheduler_file)
        record = {k: flow[k] for k in ("num_train_timesteps", "shift", "timestep_scale") if k in flow}
        patches = apply_net_patches(net, {"flow_timesteps": record, **(family["patches"] if family else {})})
        alphas = flow_alphas_cumprod(flow_sigmas(flow["num_train_timesteps"], flow["shift"]))
        extra = {"prediction_type": "flow", "flow_shift": flow["shift"], "net_patches": patches}
        if "dynamic" in flow:
            extra["dynamic_shift"] = flow["dynamic"]
    else:
        alphas = alphas_cumprod_from_scheduler(scheduler, scheduler_file) if scheduler else linear_alphas_cumprod()
        extra = {"prediction_type": (scheduler or {}).get("prediction_type", "epsilon")}
        if family and family["patches"]:
            extra["net_patches"] = apply_net_patches(net, family["patches"])
    if family:
        shape = family["sample_shape"]
    else:
        size = cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(cfg["in_channels"]), int(h), int(w))

    if family:
        kind, forward, num_classes = family["kind"], EMBEDDING_FORWARDS[family["kind"]], None
        extra |= {"conditioning": "embeddings", "conditioning_fields": family["fields"]}
    elif class_name == "DiTTransformer2DModel":
        kind, forward, num_classes = "dit", dit_forward, int(cfg["num_embeds_ada_norm"])
    else:
        if cfg.get("time_embedding_type", "positional") == "fourier":
            raise InputError(f"{model_dir}: score-SDE U-Nets (fourier time embedding) are not supported; use a DDPM-style UNet2DModel")
        if cfg.get("class_embed_type") is not None:
            raise InputError(f"{model_dir}: class_embed_type {cfg['class_embed_type']!r} is not supported; use num_class_embeds or an unconditional U-Net")
        k = cfg.get("num_class_embeds")
        kind, forward, num_classes = "unet", unet_forward, (int(k) - 1 if k else None)

    decode_record, vae_info = {"type": "identity"}, None
    if vae_dir is not None:
        vae_cfg = _read_json(vae_dir / "config.json")
        scaling, shift = float(vae_cfg.get("scaling_factor", 0.18215)), float(vae_cfg.get("shift_factor") or 0.0)
        # absolute: a quantized checkpoint reloads this VAE from here, from any working directory
        decode_record = {"type": "vae", "path": str(vae_dir.resolve()), "scaling_factor": scaling}
        vae_info = {"scaling_factor": scaling}
        if shift:   # FLUX / SD3 VAEs: latents = (z − shift_factor) · scaling_factor
            decode_record["shift_factor"] = vae_info["shift_factor"] = shift
    decode = build_decoder(decode_record)

    # source absolute: a quantized checkpoint finds the pipeline (text encoders for --prompts) from any directory
    config = {"class": class_name, "config": json.loads(json.dumps(cfg, default=list)), "source": str(path.resolve()),
              "scheduler": scheduler, "vae": vae_info, "decode": decode_record, **extra}
    if index and index.get("id2label"):
        config["id2label"] = index["id2label"]
    return DiffusionModel(
        spec=str(path), net=net, kind=kind, sample_shape=tuple(shape),
        alphas_cumprod=alphas, forward_fn=forward, num_classes=num_classes, decode=decode,
        sha256=input_record(path)["sha256"], config=config,
    )
