"""The one interface every model loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from diffpro_cli.errors import InputError


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM/DiT linear beta schedule, as cumulative alpha products in float64 (as ADM/DiT compute it)."""
    # not diffusers' DDPMScheduler(beta_schedule="linear").alphas_cumprod: it is float32, off by up to 3.6e-7 relative (t=608)
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def dit_forward(net, x, t, y):
    """DiT call; y=None means the null (CFG) label."""
    if y is None:
        y = torch.full((x.shape[0],), net.config.num_embeds_ada_norm, dtype=torch.long, device=x.device)
    return net(x, timestep=t, class_labels=y, return_dict=False)[0]


def unet_forward(net, x, t, y):
    """UNet2DModel call; for a class-conditional U-Net y=None means the last class index (null)."""
    if net.config.num_class_embeds is None:
        y = None
    elif y is None:
        y = torch.full((x.shape[0],), net.config.num_class_embeds - 1, dtype=torch.long, device=x.device)
    return net(x, t, class_labels=y, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# Loader settings that a diffusers config cannot express. A loader that changes its network after
# construction records the change in `config["net_patches"]` (name → value) and makes it through
# `apply_net_patches`; a quantized checkpoint stores the same record with its architecture and
# load_quantized re-applies it through the same function, so the two paths cannot drift apart.
# (Everything else a loader decides — sample shape, classes, schedule — is stored by value; the
# decoder is `config["decode"]`, built by diffusers_dir.build_decoder.)
# ---------------------------------------------------------------------------------------------


def _set_timestep_freq_shift(net: nn.Module, shift: float) -> None:
    """downscale_freq_shift of every DiT block's sinusoidal timestep projection (diffusers builds 1;
    the original facebookresearch/DiT uses 0)."""
    blocks = getattr(net, "transformer_blocks", None)
    if not blocks:
        raise InputError(f"timestep_freq_shift applies to DiT transformers, not {type(net).__name__}; re-quantize from the original model")
    for block in blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


NET_PATCHES: dict[str, Callable[[nn.Module, object], None]] = {
    "timestep_freq_shift": _set_timestep_freq_shift,
}


def apply_net_patches(net: nn.Module, patches: dict | None) -> dict:
    """Apply recorded post-construction settings to `net`; returns them (a copy) for config["net_patches"]."""
    patches = dict(patches or {})
    unknown = sorted(set(patches) - set(NET_PATCHES))
    if unknown:
        raise InputError(f"network setting {unknown[0]!r} is unknown to this diffpro (knows {', '.join(sorted(NET_PATCHES))}); "
                         "upgrade diffpro or re-quantize from the original model")
    for name, value in patches.items():
        NET_PATCHES[name](net, value)
    return patches


# Roles of quantizable layers; planners use them for protection defaults.
ROLES = ("attn_qkv", "attn_out", "mlp", "adaln", "time_embed", "class_embed", "patch_embed", "final", "conv", "other")


@dataclass
class DiffusionModel:
    """A noise-prediction network plus everything a sampler and a quantizer need to know about it.

    `net` is called through `eps(x_t, t, y)`; the kind-specific call convention lives in `forward_fn`.
    """

    spec: str
    net: nn.Module
    kind: str                              # "dit" | "unet" | "custom"
    sample_shape: tuple[int, int, int]     # (C, H, W) of x_t
    alphas_cumprod: torch.Tensor           # float64, over the training timesteps
    forward_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    num_classes: int | None = None         # None: unconditional. Null (CFG) label == num_classes
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    random_weights: bool = False           # True: never report FID on it
    untrained: bool = False
    sha256: str | None = None              # of the weights file(s) this was loaded from
    config: dict = field(default_factory=dict)  # JSON-able description (architecture config, source; see below)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for x_t at integer timesteps t (shape [B]) and labels y (shape [B] or None)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.forward_fn(self.net, x, t, y)
        c = x.shape[1]
        if out.shape[1] == 2 * c:  # learned sigma (DiT): first half is epsilon
            out = out[:, :c]
        return out

    def quantizable_layers(self) -> dict[str, tuple[nn.Module, str]]:
        """Every nn.Linear / nn.Conv2d by qualified name, with its role."""
        from diffpro_cli.models.roles import layer_role

        found = {}
        for name, mod in self.net.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) or getattr(mod, "is_diffpro_quant", False):
                found[name] = (mod, layer_role(self.kind, name, mod))
        return found

    def describe(self) -> dict:
        """JSON-able summary for artifacts and reports."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
            "num_train_timesteps": self.num_train_timesteps,
            "random_weights": self.random_weights,
            "untrained": self.untrained,
            "sha256": self.sha256,
            "params": sum(p.numel() for p in self.net.parameters()),
        }
