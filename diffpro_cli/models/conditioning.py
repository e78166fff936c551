"""The conditioning record a sampler passes to a model unchanged.

A `Conditioning` holds, per sample (leading dimension = batch), either class labels or precomputed
text embeddings (`encoder_hidden_states` with optional `pooled_projections`, `encoder_attention_mask`,
SDXL-style `added_cond_kwargs`, a FLUX-style `guidance` value), plus optionally its unconditional
counterpart `uncond` (same batch size) for classifier-free guidance. Samplers never look inside: they
slice it per batch (`take`, `batch`), duplicate it for CFG (`cat` with `unconditional()`) and hand it
to `DiffusionModel.eps`, whose loader-specific forward reads the fields it needs.

A plain LongTensor of class labels (or None) keeps working everywhere: `as_conditioning` wraps it, and
class-conditioned models still receive a plain label tensor in their forward.

Files of precomputed embeddings (`load_conditioning`): `.safetensors` or a weights-only `.pt` dict with
  encoder_hidden_states [M, L, D]  (alias prompt_embeds)
  pooled_projections    [M, P]     (alias pooled_prompt_embeds)            optional
  encoder_attention_mask [M, L]    (alias prompt_attention_mask)           optional
  guidance              [M]                                                optional
  added_cond_kwargs.<name> [M, ...] (SDXL: text_embeds, time_ids)          optional
  negative_<field> [M or 1, ...]   the unconditional counterpart (CFG)     optional
or class_labels [M] (long). Sample i of a calibration run uses entry i % M (`cycle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from diffpro_cli.errors import InputError, UsageError

TENSOR_FIELDS = ("class_labels", "encoder_hidden_states", "pooled_projections", "encoder_attention_mask", "guidance")
ALIASES = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections",
           "prompt_attention_mask": "encoder_attention_mask", "labels": "class_labels", "y": "class_labels"}


@dataclass
class Conditioning:
    class_labels: torch.Tensor | None = None            # [B] long
    encoder_hidden_states: torch.Tensor | None = None   # [B, L, D]
    pooled_projections: torch.Tensor | None = None      # [B, P]
    encoder_attention_mask: torch.Tensor | None = None  # [B, L]
    guidance: torch.Tensor | None = None                # [B] (guidance-distilled models)
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)  # each [B, ...]
    uncond: "Conditioning | None" = None                # the unconditional counterpart, same batch size

    # -- shape ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every per-sample tensor by name (added_cond_kwargs as 'added_cond_kwargs.<name>'), uncond excluded."""
        out = {name: getattr(self, name) for name in TENSOR_FIELDS if getattr(self, name) is not None}
        out.update({f"added_cond_kwargs.{k}": v for k, v in self.added_cond_kwargs.items()})
        return out

    def __len__(self) -> int:
        sizes = {int(v.shape[0]) for v in self.tensors().values()}
        if len(sizes) != 1:
            raise UsageError(f"conditioning fields disagree on the batch size ({sorted(sizes)}); give every field one row per sample")
        return sizes.pop()

    @property
    def is_class(self) -> bool:
        return self.class_labels is not None and self.encoder_hidden_states is None

    # -- slicing (what a sampler does per batch) ------------------------------------------------

    def _map(self, fn) -> "Conditioning":
        kw = {name: (fn(getattr(self, name)) if getattr(self, name) is not None else None) for name in TENSOR_FIELDS}
        return Conditioning(**kw, added_cond_kwargs={k: fn(v) for k, v in self.added_cond_kwargs.items()},
                            uncond=self.uncond._map(fn) if self.uncond is not None else None)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> "Conditioning":
        """Rows `indices` of every field (and of the unconditional counterpart)."""
        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
        return self._map(lambda v: v.index_select(0, idx.to(v.device)))

    def take(self, start: int, n: int) -> "Conditioning":
        """Rows start … start+n-1."""
        return self._map(lambda v: v[start:start + n])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._map(lambda v: v[key])
        return self.batch(key)

    def cycle(self, n: int, offset: int = 0) -> "Conditioning":
        """n rows where row j is entry (offset + j) % len(self): the calibration convention (like i % classes)."""
        m = len(self)
        return self.batch([(offset + j) % m for j in range(n)])

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Moves tensors; a float dtype applies to floating tensors only."""
        return self._map(lambda v: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of every item one after another (fields present in all items; uncond dropped)."""
        first = items[0]
        kw = {}
        for name in TENSOR_FIELDS:
            vals = [getattr(c, name) for c in items]
            if all(v is not None for v in vals):
                kw[name] = torch.cat(vals)
            elif any(v is not None for v in vals):
                raise UsageError(f"conditioning field {name} is set for some samples only; give it for every sample")
        added = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in first.added_cond_kwargs}
        return Conditioning(**kw, added_cond_kwargs=added)

    # -- classifier-free guidance ---------------------------------------------------------------

    def unconditional(self, null_class: int | None = None) -> "Conditioning":
        """The unconditional counterpart: `uncond` when given; for class labels the null label."""
        if self.uncond is not None:
            return self.uncond
        if self.is_class and null_class is not None:
            return Conditioning(class_labels=torch.full_like(self.class_labels, null_class))
        raise UsageError("classifier-free guidance needs unconditional embeddings (negative_prompt_embeds / negative_* in the "
                         "conditioning file); add them, pass --prompts (it encodes the --negative-prompt), or guide with "
                         "--cfg 1 (cfg_scale=1 in the API)")

    # -- description ----------------------------------------------------------------------------

    def describe(self) -> dict:
        """JSON-able shapes (for artifacts)."""
        out = {k: list(v.shape) for k, v in self.tensors().items()}
        if self.uncond is not None:
            out["uncond"] = self.uncond.describe()
        return out


def to_device(y, device):
    """Labels (a tensor) or a Conditioning moved to `device` (Conditioning.to); None stays None."""
    return y.to(device) if isinstance(y, (torch.Tensor, Conditioning)) else y


def as_conditioning(y) -> Conditioning | None:
    """A Conditioning from a Conditioning, a LongTensor of class labels, or None (kept None)."""
    if y is None or isinstance(y, Conditioning):
        return y
    if isinstance(y, torch.Tensor):
        return Conditioning(class_labels=y)
    raise UsageError(f"conditioning must be class labels (a LongTensor) or a Conditioning, not {type(y).__name__}")


def take(y, start: int, n: int):
    """Rows start … start+n-1 of labels, a Conditioning or None."""
    if y is None:
        return None
    if isinstance(y, Conditioning):
        return y.take(start, n)
    return y[start:start + n]


def cat_conditions(items):
    """torch.cat for label tensors, Conditioning.cat for records; None stays None."""
    if not items or items[0] is None:
        return None
    if isinstance(items[0], Conditioning):
        return Conditioning.cat(items)
    return torch.cat(items)


# ---------------------------------------------------------------------------------------------
# Files of precomputed embeddings
# ---------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def conditioning_from_tensors(tensors: dict[str, torch.Tensor], source: str | Path = "conditioning") -> Conditioning:
    """A Conditioning from flat named tensors (see module docstring), validating the batch sizes."""
    main: dict[str, torch.Tensor] = {}
    neg: dict[str, torch.Tensor] = {}
    for raw, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{source}: entry {raw!r} is not a tensor; store only tensors")
        target = main
        name = raw
        if raw.startswith("negative_"):
            target, name = neg, raw[len("negative_"):]
        name = _canonical(name) if not name.startswith("added_cond_kwargs.") else name
        if name not in TENSOR_FIELDS and not name.startswith("added_cond_kwargs."):
            raise InputError(f"{source}: unknown entry {raw!r}; use encoder_hidden_states/prompt_embeds, pooled_projections, "
                             "encoder_attention_mask, guidance, added_cond_kwargs.<name>, class_labels (and negative_* counterparts)")
        target[name] = value
    if not main:
        raise InputError(f"{source}: holds no conditioning (expected prompt_embeds / encoder_hidden_states or class_labels)")
    if "class_labels" in main and main["class_labels"].is_floating_point():
        raise InputError(f"{source}: class_labels must be integers; save them as a long tensor")
    sizes = {k: int(v.shape[0]) if v.ndim else -1 for k, v in main.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise InputError(f"{source}: entries disagree on the number of prompts ({sizes}); give every entry one row per prompt")
    m = next(iter(sizes.values()))

    def build(d: dict) -> Conditioning:
        added = {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("added_cond_kwargs.")}
        return Conditioning(**{k: v for k, v in d.items() if k in TENSOR_FIELDS}, added_cond_kwargs=added)

    _check_companions(main, source)
    cond = build(main)
    if neg:
        missing = sorted(set(main) - set(neg) - {"guidance", "class_labels"})
        if missing:
            raise InputError(f"{source}: negative_* entries lack {', '.join('negative_' + k for k in missing)}; give every field's counterpart")
        for k, v in list(neg.items()):
            if v.ndim == 0 or v.shape[0] not in (1, m):
                raise InputError(f"{source}: negative_{k} has {v.shape[0] if v.ndim else 0} rows; give 1 or {m}")
            if v.shape[0] == 1 and m > 1:
                neg[k] = v.expand(m, *v.shape[1:]).contiguous()
            if main.get(k) is not None and tuple(neg[k].shape[1:]) != tuple(main[k].shape[1:]):
                raise InputError(f"{source}: negative_{k} has shape {tuple(v.shape)} but {k} {tuple(main[k].shape)}; "
                                 "encode both with the same text encoder settings")
        _check_companions(neg, source, "negative_")
        for k in ("guidance",):   # shared by both halves of a CFG batch
            if k in main and k not in neg:
                neg[k] = main[k]
        cond.uncond = build(neg)
    return cond


def _check_companions(d: dict[str, torch.Tensor], source, prefix: str = "") -> None:
    """The mask is [M, L] of its own embeddings and guidance one value per prompt [M]: the networks take
    them as they come, so a mask of another length was a size-mismatch traceback inside the attention and a
    [M, 1] guidance FLUX's 'Timesteps should be a 1d-array' assertion."""
    mask, states = d.get("encoder_attention_mask"), d.get("encoder_hidden_states")
    if mask is not None and states is not None and (mask.ndim != 2 or tuple(mask.shape) != tuple(states.shape[:2])):
        raise InputError(f"{source}: {prefix}encoder_attention_mask has shape {tuple(mask.shape)} but {prefix}encoder_hidden_states "
                         f"{tuple(states.shape)}; give one mask entry per token ([M, L]), as the pipeline's encode_prompt returns them")
    guidance = d.get("guidance")
    if guidance is not None and guidance.ndim != 1:
        raise InputError(f"{source}: {prefix}guidance has shape {tuple(guidance.shape)}; give one guidance value per prompt ([M])")


def load_conditioning(path: str | Path) -> Conditioning:
    """Read a conditioning file (.safetensors or weights-only .pt/.pth holding a dict of tensors)."""
    from diffpro_cli.models.diffusers_dir import read_weights

    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise InputError(f"{path}: conditioning files are .safetensors or .pt; save the embeddings with safetensors.torch.save_file")
    obj = read_weights(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save {{'prompt_embeds': ...}}")
    return conditioning_from_tensors(obj, path)


# what to give, for the added conditions whose values are not text-encoder outputs
_SIZE_CONDITIONS = ("give PixArt-α's size conditions per prompt: added_cond_kwargs.resolution [M, 2] (pixel height, width) "
                    "and added_cond_kwargs.aspect_ratio [M, 1] (height / width), as --prompts does")
_FIXES = {".time_ids": "give SDXL's six time ids per prompt (original height, width, crop top, crop left, target height, "
                       "width; the refiner's aesthetic-score ids are not supported)",
          ".resolution": _SIZE_CONDITIONS, ".aspect_ratio": _SIZE_CONDITIONS}


def check_fits(cond: Conditioning, expected: dict | None, source: str | Path = "conditioning") -> None:
    """Check a Conditioning's trailing shapes against a model's expectation {field: [dims, None = any]}."""
    if not expected:
        return
    have = cond.tensors()
    for name, dims in expected.items():
        fix = next((text for suffix, text in _FIXES.items() if str(name).endswith(suffix)), None)
        if name not in have:
            if dims is not None and not str(name).startswith("optional:"):
                raise InputError(f"{source}: the model needs {name} (trailing shape {dims}); {fix or 'encode the prompts with its pipeline'}")
            continue
        shape = list(have[name].shape[1:])
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise InputError(f"{source}: {name} has trailing shape {shape} but the model expects {dims}; "
                             f"{fix or 'encode the prompts with the text encoder this model was trained with'}")


def conditioning_to_tensors(cond: Conditioning) -> dict[str, torch.Tensor]:
    """The flat named tensors of a conditioning file (the inverse of conditioning_from_tensors)."""
    out = {name: v.contiguous() for name, v in cond.tensors().items()}
    if cond.uncond is not None:
        out.update({f"negative_{name}": v.contiguous() for name, v in cond.uncond.tensors().items()})
    return out


def conditioning_sha256(cond: Conditioning) -> str:
    """sha256 over every tensor of the record (names, dtypes, shapes, values; uncond included): the identity of
    the embeddings a run calibrated on, whichever way they were made."""
    import hashlib

    digest = hashlib.sha256()
    parts = [("", cond)] + ([("negative_", cond.uncond)] if cond.uncond is not None else [])
    for prefix, c in parts:
        for name, value in sorted(c.tensors().items()):
            v = value.detach().cpu().contiguous()
            digest.update(f"{prefix}{name}:{v.dtype}:{list(v.shape)};".encode())
            digest.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return digest.hexdigest()
