"""The one interface every model loader returns."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from diffpro_cli.devices import net_device
from diffpro_cli.errors import InputError, UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM/DiT linear beta schedule, as cumulative alpha products in float64 (as ADM/DiT compute it)."""
    # not diffusers' DDPMScheduler(beta_schedule="linear").alphas_cumprod: it is float32, off by up to 3.6e-7 relative (t=608)
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def flow_sigmas(num_steps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The flow-matching training sigmas (float64, increasing with the index): σ_i = shift·s/(1 + (shift − 1)·s) with
    s = (i + 1)/N, i.e. diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift).sigmas
    reversed. x_σ = (1 − σ)·x0 + σ·noise; the network is called at timestep σ·N."""
    s = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    return shift * s / (1 + (shift - 1) * s)


def flow_alphas_cumprod(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ of the variance-preserving schedule with the same signal-to-noise ratio as flow sigmas:
    SNR = ((1 − σ)/σ)² = ᾱ/(1 − ᾱ). Stored as a flow model's alphas_cumprod (σ = 1 gives ᾱ = 0)."""
    a, s = (1 - sigmas) ** 2, sigmas ** 2
    return a / (a + s)


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


def sd3_forward(net, x, t, c):
    """SD3Transformer2DModel call with a Conditioning (encoder_hidden_states, pooled_projections)."""
    return net(hidden_states=x, encoder_hidden_states=c.encoder_hidden_states, pooled_projections=c.pooled_projections,
               timestep=t, return_dict=False)[0]


def pixart_forward(net, x, t, c):
    """PixArtTransformer2DModel call (T5 embeddings + mask; PixArt-α 1024 resolution/aspect conditions in added_cond_kwargs)."""
    added = dict(c.added_cond_kwargs) or {"resolution": None, "aspect_ratio": None}
    return net(x, encoder_hidden_states=c.encoder_hidden_states, timestep=t, added_cond_kwargs=added,
               encoder_attention_mask=c.encoder_attention_mask, return_dict=False)[0]


def unet_cond_forward(net, x, t, c):
    """UNet2DConditionModel call (SD 1.x/2.x text embeddings; SDXL text_embeds/time_ids in added_cond_kwargs)."""
    return net(x, t, encoder_hidden_states=c.encoder_hidden_states, encoder_attention_mask=c.encoder_attention_mask,
               added_cond_kwargs=dict(c.added_cond_kwargs) or None, return_dict=False)[0]


def flux_pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents → FLUX's packed tokens [B, (H/2)(W/2), 4C] (2×2 patches; FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def flux_unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of flux_pack: [B, (H/2)(W/2), 4C] → [B, C, H, W] (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """FLUX's rotary position ids of the (h/2)·(w/2) image tokens: rows (0, row, column) (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


def flux_forward(net, x, t, c):
    """FluxTransformer2DModel call on unpacked latents [B, C, H, W]: packs 2×2 patches, builds img_ids/txt_ids as
    FluxPipeline does, and passes `guidance` (guidance-distilled models: the Conditioning's, else the loader's
    recorded default, net patch `default_guidance`). The timestep reaches the network as σ (flow_timesteps with
    timestep_scale 1/N: FluxPipeline passes t/1000)."""
    b, _, h, w = x.shape
    guidance = None
    if net.config.guidance_embeds:
        guidance = c.guidance if c.guidance is not None else torch.full((b,), float(getattr(net, "diffpro_default_guidance", 3.5)))
        guidance = guidance.to(device=x.device, dtype=torch.float32)
    txt_ids = torch.zeros(c.encoder_hidden_states.shape[1], 3, device=x.device)
    out = net(hidden_states=flux_pack(x), encoder_hidden_states=c.encoder_hidden_states, pooled_projections=c.pooled_projections,
              timestep=t, img_ids=flux_image_ids(h, w, x.device), txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return flux_unpack(out, h, w)


def sana_forward(net, x, t, c):
    """SanaTransformer2DModel call (Gemma embeddings + mask; timestep_scale applied by the flow_timesteps patch)."""
    return net(x, encoder_hidden_states=c.encoder_hidden_states, encoder_attention_mask=c.encoder_attention_mask,
               timestep=t, return_dict=False)[0]


# the call convention of each embedding-conditioned kind (checkpoint reloads pick it by kind)
EMBEDDING_FORWARDS = {"sd3": sd3_forward, "pixart": pixart_forward, "unet_cond": unet_cond_forward,
                      "flux": flux_forward, "sana": sana_forward}


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


def _set_flow_timesteps(net: nn.Module, record: dict) -> None:
    """Flow-matching networks take timestep σ·N (a float); diffpro calls every network with the integer index of
    its training schedule (so profiles, static activation scales and plans are keyed by index). This forward
    pre-hook maps an integer `timestep` (keyword, else the second positional argument) to σ_index·N; float
    timesteps (a diffusers pipeline calling the same network) pass through unchanged. `timestep_scale` (default 1)
    multiplies σ·N as the pipeline does before the call: 1/N for FLUX (it passes t/1000), Sana's config.timestep_scale.
    A FLUX-style dynamic (resolution-dependent) shift is recorded as the equivalent fixed `shift` = exp(mu)."""
    n, shift = int(record["num_train_timesteps"]), float(record["shift"])
    table = flow_sigmas(n, shift) * n * float(record.get("timestep_scale", 1.0))
    old = getattr(net, "_diffpro_flow_hook", None)
    if old is not None:
        old.remove()
    # install_timestep_hook maps a float timestep (a pipeline's σ·N) back to the nearest index with it
    net.__dict__["_diffpro_flow_table"] = table.to(torch.float32)

    # its own attribute: install_timestep_hook's marker is another, so installing one never skips the other
    net._diffpro_flow_hook = net.register_forward_pre_hook(_flow_timestep_hook, with_kwargs=True)


def index_of_timestep(net: nn.Module, t):
    """diffpro's integer timestep index for a call's `timestep`: a flow network called by a pipeline gets
    σ·N (a float), mapped back to the nearest index of its training schedule; anything else as it is."""
    table = getattr(net, "_diffpro_flow_table", None)
    if table is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return (table.to(t.device) - t.float().reshape(-1, 1)).abs().argmin(dim=-1)


def _flow_timestep_hook(module, args, kwargs):
    """_set_flow_timesteps' pre-hook (module level, so a network carrying it pickles)."""
    table = module._diffpro_flow_table

    def to_net(t):
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex():
            return table.to(t.device)[t.long()]
        return t

    if "timestep" in kwargs:
        kwargs = dict(kwargs, timestep=to_net(kwargs["timestep"]))
    elif len(args) >= 2:
        args = (args[0], to_net(args[1]), *args[2:])
    return args, kwargs


def _set_default_guidance(net: nn.Module, scale: float) -> None:
    """The guidance value a guidance-distilled network (FLUX.1-dev's guidance_embeds) gets when the conditioning
    carries none (flux_forward reads it)."""
    net.diffpro_default_guidance = float(scale)


NET_PATCHES: dict[str, Callable[[nn.Module, object], None]] = {
    "timestep_freq_shift": _set_timestep_freq_shift,
    "flow_timesteps": _set_flow_timesteps,
    "default_guidance": _set_default_guidance,
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
ROLES = ("attn_qkv", "attn_out", "cross_attn_qkv", "cross_attn_out", "mlp", "adaln", "time_embed", "class_embed",
         "context_embed", "patch_embed", "final", "conv", "other")


@contextlib.contextmanager
def _diffusers_quiet():
    """diffusers' own logger at error level for the duration (no-op without diffusers)."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


COMPUTE_DTYPE_ATTR = "_diffpro_compute_dtype"   # on the network: the dtype its own calls compute in


@dataclass
class DiffusionModel:
    """A denoising network plus everything a sampler and a quantizer need to know about it.

    `net` is called through `eps(x_t, t, cond)` (or `velocity` for flow models) with integer indices t of the
    training schedule; the kind-specific call convention lives in `forward_fn(net, x, t, cond)`, which gets
    plain class labels (or None) for class-conditioned and unconditional models and the whole
    `Conditioning` record for embedding-conditioned ones.

    prediction_type: "epsilon" (noise), "v_prediction" (v = √ᾱ·ε − √(1−ᾱ)·x0) or "flow" (velocity
    v = ε − x0 of x_σ = (1 − σ)·x0 + σ·ε, sigmas from `flow_shift`). Loaders record it (and the shift) in
    `config` too, so quantized checkpoints, which rebuild from the config, keep it.
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
    prediction_type: str | None = None     # None: config["prediction_type"], else "epsilon"
    flow_shift: float | None = None        # flow models: None → config["flow_shift"], else 1.0
    conditioning: str | None = None        # "class" | "embeddings" | "none"; None → from config / num_classes
    conditioning_fields: dict | None = None  # embeddings: {field: trailing shape (None = any size)} the network needs
    conditioning_set: object | None = field(default=None, repr=False)  # Conditioning of M entries; sample i uses i % M
    compute_dtype: torch.dtype | None = None   # bf16/fp16: the float math runs under autocast (set_compute_dtype)

    def __post_init__(self):
        cfg = self.config if isinstance(self.config, dict) else {}
        self.prediction_type = self.prediction_type or cfg.get("prediction_type") or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"{self.spec}: prediction_type {self.prediction_type!r} is not supported; diffpro knows {', '.join(PREDICTION_TYPES)}")
        if self.prediction_type == "flow" and self.flow_shift is None:
            self.flow_shift = float(cfg.get("flow_shift", 1.0))
        if self.conditioning is None:
            self.conditioning = cfg.get("conditioning") or ("class" if self.num_classes is not None else "none")
        if self.compute_dtype is not None:   # a checkpoint loaded with its planned dtype: the network's own calls too
            self.net.__dict__[COMPUTE_DTYPE_ATTR] = self.compute_dtype
        if self.conditioning_fields is None and cfg.get("conditioning_fields"):
            self.conditioning_fields = cfg["conditioning_fields"]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def with_conditioning(self, cond) -> "DiffusionModel":
        """Attach a calibration set (a Conditioning, or a file path read with load_conditioning) after checking that
        its shapes fit this network; returns self."""
        from diffpro_cli.models.conditioning import Conditioning, check_fits, load_conditioning

        source = cond if not isinstance(cond, Conditioning) else "conditioning"
        if not isinstance(cond, Conditioning):
            cond = load_conditioning(cond)
        if self.conditioning != "embeddings":
            if not cond.is_class or self.num_classes is None:
                raise UsageError(f"{self.spec}: takes {'class labels' if self.num_classes is not None else 'no conditioning'}; "
                                 "drop the conditioning file (or give class_labels)")
            if bool(((cond.class_labels < 0) | (cond.class_labels >= self.num_classes)).any()):
                raise InputError(f"{source}: class_labels must lie in 0..{self.num_classes - 1}")
        else:
            check_fits(cond, self.conditioning_fields, source)
        self.conditioning_set = cond
        return self

    def set_compute_dtype(self, dtype) -> "DiffusionModel":
        """Run the float math in `dtype` (bf16 / fp16; float32 undoes it): a float network's weights are cast
        once; a quantized one keeps its integer weights and scales (integer kernels take float32 at their
        edges, weight-only layers keep one weight copy per dtype). `raw` runs under autocast and returns
        the input's dtype, so samplers stay in float32."""
        given = dtype
        dtype = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UsageError(f"compute dtype {given!r}: use torch.bfloat16, torch.float16 or torch.float32 (or their names)")
        if not self.is_quantized:
            with _diffusers_quiet():   # its "modules that should be kept in float32: []" note at every cast
                self.net.to(dtype)
        self.compute_dtype = None if dtype == torch.float32 else dtype
        # for callers of the network itself (a diffusers pipeline): diffpro's timestep hook runs each call
        # under autocast in this dtype, as `raw` does (api.install_timestep_hook)
        self.net.__dict__[COMPUTE_DTYPE_ATTR] = self.compute_dtype
        return self

    @property
    def is_quantized(self) -> bool:
        """Whether any layer of the network is a diffpro integer layer (a quantized checkpoint or quantize_)."""
        return any(getattr(m, "is_diffpro_quant", False) for m in self.net.modules())

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def sigmas(self) -> torch.Tensor:
        """Flow models: σ over the training indices (float64, increasing); others: √(1 − ᾱ)."""
        if self.is_flow:
            return flow_sigmas(self.num_train_timesteps, self.flow_shift)
        return (1 - self.alphas_cumprod).clamp_min(0).sqrt()

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) over the training indices with x_t = a·x0 + s·ε (float64): (√ᾱ, √(1−ᾱ)) or, for flow, (1 − σ, σ)."""
        if self.is_flow:
            sig = self.sigmas()
            return 1 - sig, sig
        acp = self.alphas_cumprod.double()
        return acp.sqrt(), (1 - acp).clamp_min(0).sqrt()

    def _net_conditioning(self, y):
        from diffpro_cli.models.conditioning import Conditioning

        if self.conditioning == "embeddings":
            if not isinstance(y, Conditioning) or y.encoder_hidden_states is None:
                raise UsageError(f"{self.spec}: is conditioned on text embeddings; pass --prompts FILE (prompts encoded with the pipeline's text encoders) or --conditioning FILE (prompt embeddings)")
            return y
        if isinstance(y, Conditioning):   # class-conditioned / unconditional networks keep their label convention
            return y.class_labels
        return y

    def raw(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        """The network's own prediction (learned-variance channels dropped) at integer timesteps t ([B] or scalar)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        device = net_device(self.net)
        if device.type != "cpu" or x.device != device:   # a network on a GPU: inputs follow it (no-op where
            from diffpro_cli.models.conditioning import to_device   # they are there), the output comes back

            return self._raw_on(x.to(device), t.to(device), to_device(y, device)).to(x.device)
        return self._raw_on(x, t, y)

    def _raw_on(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        low = self.compute_dtype not in (None, torch.float32)
        with torch.autocast(x.device.type, dtype=self.compute_dtype) if low else contextlib.nullcontext():
            out = self.forward_fn(self.net, x, t, self._net_conditioning(y)).to(x.dtype)
        c = x.shape[1]
        if out.shape[1] == 2 * c:  # learned sigma (DiT): first half is the prediction
            out = out[:, :c]
        return out

    def _coef(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.coefficients()
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        shape = (-1,) + (1,) * (x.ndim - 1)
        idx = t.long().cpu()
        return a[idx].to(x.dtype).view(shape).to(x.device), s[idx].to(x.dtype).view(shape).to(x.device)

    def output_to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε-equivalent of a raw prediction: v-prediction ε = √ᾱ·v + √(1−ᾱ)·x_t; flow ε = x_σ + (1 − σ)·v."""
        if self.prediction_type == "epsilon":
            return out
        a, s = self._coef(t, x)
        if self.prediction_type == "v_prediction":
            return a * out + s * x
        return x + a * out

    def eps(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        """Predicted noise (ε-equivalent for v-prediction and flow models) for x_t at integer timesteps t
        (shape [B]) and conditioning y (class labels [B], a Conditioning, or None)."""
        out = self.raw(x, t, y)
        return out if self.prediction_type == "epsilon" else self.output_to_eps(out, x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        """Flow models: the predicted velocity v = ε − x0 at integer timesteps t (the network's output)."""
        if not self.is_flow:
            raise UsageError(f"{self.spec}: velocity() is for flow-matching models; this one predicts {self.prediction_type} (use eps())")
        return self.raw(x, t, y)

    def sampler_output(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        """What samplers step with: the velocity for flow models, ε otherwise."""
        return self.velocity(x, t, y) if self.is_flow else self.eps(x, t, y)

    @property
    def clip_x0_default(self) -> bool:
        """Samplers clip the predicted x0 to [-1, 1] by default only in pixel space (decode = identity and no
        VAE recorded); latent models are sampled unclipped, as their diffusers pipelines do."""
        decode = (self.config or {}).get("decode") or {"type": "identity"}
        return decode.get("type", "identity") == "identity" and not (self.config or {}).get("vae")

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
            "prediction_type": self.prediction_type,
            **({"flow_shift": self.flow_shift} if self.is_flow else {}),
            "conditioning": self.conditioning,
            "random_weights": self.random_weights,
            "untrained": self.untrained,
            "sha256": self.sha256,
            "params": sum(p.numel() for p in self.net.parameters()),
        }
