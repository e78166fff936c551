"""QuantLinear and QuantConv2d: integer weights stored as buffers, run by a kernel from the registry.

State (what `state_dict` holds and the checkpoint stores):
  qweight        int8 [out, in·kh·kw] for 8-bit weights; packed uint8 bytes for fewer bits (formats.py)
  weight_scale   float32 [out, groups]
  bias           float32 [out] (if the float layer had one)
  act_timesteps  int64 [T], act_absmax float32 [T]   (act_mode "static" only: calibrated max |x| per timestep)

The kernel (kernels.py) is prepared for the device of the first input, and again if the input moves to
another device; `prepare()` does it eagerly (the checkpoint loader calls it so load time and load
memory are honest). Layers that always see the same input (attention q/k/v) can share one fused GEMM
(groups.py, `fuse_shared_inputs`); their stored state stays per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.quant import kernels
from diffpro_cli.quant.epilogue import apply_post_op
from diffpro_cli.quant.formats import STORAGE_BITS, dequantize_weight, fp16_exact, gptq_quantize, layout_name, pack_bits, packed_numel, quantize_weight, unpack_bits
from diffpro_cli.quant.kernel_common import _explicit_padding, _pad

if TYPE_CHECKING:
    from diffpro_cli.quant.groups import SharedInputGroup

RELEASED_MESSAGE = ("this quantized model was loaded for inference only (its integer weights were released after packing), "
                    "so it has no state_dict to save, repack or move; load the checkpoint with "
                    "diffpro.load(path, keep_integers=True) for that")

_TIMESTEPS: contextvars.ContextVar = contextvars.ContextVar("diffpro_timesteps", default=None)


@contextlib.contextmanager
def timestep_context(t: torch.Tensor | int | None):
    """Tell static-activation layers which timestep(s) the current forward pass is at ([B] or a scalar)."""
    token = _TIMESTEPS.set(None if t is None else torch.as_tensor(t).reshape(-1).contiguous().cpu())
    try:
        yield
    finally:
        _TIMESTEPS.reset(token)


def normalise_act(act_bits: int, act_mode: str) -> str:
    """The activation mode a layer runs with: act_bits ≥ 16 means float activations ("none")."""
    if act_bits >= 16 or act_mode == "none":
        return "none"
    if act_bits != 8:
        raise UsageError(f"act_bits {act_bits}: activations are int8 (8) or float (16); use 8 or 16")
    if act_mode not in kernels.ACT_MODES:
        raise UsageError(f"act_mode {act_mode!r}: use one of {', '.join(kernels.ACT_MODES)}")
    return act_mode


def _nearest(calibrated: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    pos = torch.searchsorted(calibrated, ts.to(calibrated.dtype)).clamp(0, calibrated.numel() - 1)
    below = (pos - 1).clamp_min(0)
    closer_below = (ts - calibrated[below]).abs() < (calibrated[pos] - ts).abs()
    return torch.where(closer_below, below, pos)


def call_kernel(kernel, layer, x: torch.Tensor) -> torch.Tensor:
    """`kernel(layer, x)`, then the layer's post-op (epilogue.py) unless the kernel applied it. Integer
    kernels take and give float32: in a bf16/fp16 model (compute_dtype) they are called outside autocast
    on a float32 copy and their output cast back, except kernels that read and write the model's dtype
    themselves (`low_precision_io`); kernels that compute in the input's dtype (`any_dtype`, weight-only)
    are called as they are."""
    post = getattr(layer, "post_op", None)
    fused = post is not None and getattr(kernel, "fuses", None) is not None and kernel.fuses(layer)
    if x.dtype == torch.float32 or getattr(kernel, "any_dtype", False):
        y = kernel(layer, x)
    else:
        with torch.autocast(x.device.type, enabled=False):
            y = kernel(layer, x) if getattr(kernel, "low_precision_io", False) else kernel(layer, x.float()).to(x.dtype)
    return y if fused else apply_post_op(post, y)


class _QuantBase(nn.Module):
    is_diffpro_quant = True
    kind = "?"
    _checked_shape: torch.Size | None = None   # the last input shape _check_input passed (checked once per shape)

    def _init_state(self, out_features: int, in_flat: int, bias: bool, weight_bits: int, act_mode: str,
                    group_size: int | None, num_act_timesteps: int, device=None):
        if weight_bits not in STORAGE_BITS:
            raise UsageError(f"weight bits {weight_bits}: supported widths are {', '.join(map(str, STORAGE_BITS))} (16 keeps a layer in float)")
        if group_size is not None and (group_size <= 0 or in_flat % group_size):
            raise UsageError(f"group size {group_size} does not divide a layer input size of {in_flat}; pick a divisor or omit --group-size")
        self.weight_bits = int(weight_bits)
        self.act_mode = act_mode
        self.group_size = group_size
        self.in_flat = in_flat
        groups = in_flat // group_size if group_size else 1
        if weight_bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_flat, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(packed_numel(out_features * in_flat, weight_bits), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)
        if act_mode == "static":
            self.register_buffer("act_timesteps", torch.zeros(num_act_timesteps, dtype=torch.int64, device=device))
            self.register_buffer("act_absmax", torch.zeros(num_act_timesteps, dtype=torch.float32, device=device))
        self.prefer: str | None = None      # a kernel name to try first (e.g. "cuda-fp8")
        self.post_op: str | None = None     # an activation this layer applies to its output (epilogue.py)
        self.pair_bounded = False           # weights fit AVX2's int16 pair sums with 8-bit activations (bound_pairs)
        self._kernel = None
        self._kernel_device = None
        self._kernel_label = ""
        self._group: SharedInputGroup | None = None
        self._released_bytes: int | None = None   # set by release_integers (inference-only loads)
        self._compiled_lead: _QuantBase | None = None   # set by compiled.enable (the compiled execution path)
        self._compiled_index = 0

    # -- storage ------------------------------------------------------------------------------

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None = None) -> None:
        """Quantize a float weight into this layer's buffers (GPTQ rounding when given the input
        second moment `hessian` = E[x xᵀ], else round-to-nearest)."""
        if hessian is not None:
            q, scale = gptq_quantize(weight.cpu(), self.weight_bits, hessian, self.group_size)
        else:
            q, scale = quantize_weight(weight.cpu(), self.weight_bits, self.group_size)
        device = self.weight_scale.device
        self.qweight = (q if self.weight_bits == 8 else pack_bits(q, self.weight_bits)).to(device)
        self.weight_scale = scale.to(device)
        if bias is not None:
            self.bias = bias.detach().float().clone().to(device)
        self._forget_kernel()

    def bound_pairs(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> int:
        """Re-round 8-bit per-channel weights from the float `weight` so that every pair of products an
        AVX2 kernel adds in int16 fits with full 8-bit activations (quant/pair_bound.py; the kernels
        then use the ±127 activation grid on every CPU, not AVX2's 7-bit one), replacing the stored
        integers: GPTQ rounding given `hessian` (Linear), else round-to-nearest. Returns the number of weights
        changed; 0 where it does not apply (other widths, group-wise scales, float activations, grouped convolutions)."""
        from diffpro_cli.quant.pair_bound import bound_applies, bounded_integers

        if not bound_applies(self.weight_bits, self.group_size, self.act_mode == "none") or (self.kind == "conv2d" and self.groups != 1):
            return 0
        conv = list(self.weight_shape) if self.kind == "conv2d" else None
        q, scale, changed = bounded_integers(weight, conv, hessian if self.kind == "linear" else None)
        device = self.weight_scale.device
        self.qweight = q.to(device)
        self.weight_scale = scale.reshape(-1, 1).float().to(device)
        self.pair_bounded = True
        self._forget_kernel()
        return int(changed)

    @property
    def integers_released(self) -> bool:
        return self._released_bytes is not None

    def release_integers(self) -> None:
        """Drop the stored integers once the kernel holds its own packed copy (inference-only loads:
        otherwise every weight sits in memory twice). The layer still runs on the prepared device;
        repacking, re-saving or moving it needs a load with keep_integers=True."""
        if self.integers_released:
            return
        kernel = self._group.kernel if self._group is not None else self._kernel
        if kernel is None:
            raise RuntimeError("release_integers needs a prepared kernel; call prepare() first")
        self._released_bytes = self.storage_bytes()
        self.qweight = torch.empty(0, dtype=self.qweight.dtype, device=self.qweight.device)

    def int_weight(self) -> torch.Tensor:
        """The signed integers as int8 [out, in·kh·kw] on the CPU (unpacked)."""
        if self.integers_released:
            raise UsageError(RELEASED_MESSAGE)
        out = self.weight_scale.shape[0]
        if self.weight_bits == 8:
            return self.qweight.cpu()
        return unpack_bits(self.qweight.cpu(), self.weight_bits, out * self.in_flat).reshape(out, self.in_flat)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Refused once the integers are released: the state dict would hold an empty qweight, and
        torch.save of it (or anything built on it) would write a file that loads as a broken model."""
        if self.integers_released:
            raise UsageError(RELEASED_MESSAGE)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def dequantized_weight(self) -> torch.Tensor:
        """The stored weight in float32, shaped like the float layer's (what the reference multiplies)."""
        return dequantize_weight(self.int_weight(), self.weight_scale.cpu()).reshape(self.weight_shape)

    def storage_bytes(self) -> int:
        if self._released_bytes is not None:
            return self._released_bytes
        total = 0
        for name, b in self.named_buffers():
            # scales are written as fp16 when that is exact (checkpoint._half_if_exact)
            total += b.numel() * (2 if name == "weight_scale" and fp16_exact(b) else b.element_size())
        return total

    # -- static activation ranges -------------------------------------------------------------

    def set_static_ranges(self, timesteps, absmax) -> None:
        """Calibrated max |x| per timestep (act_mode "static")."""
        if self.act_mode != "static":
            raise ValueError("set_static_ranges needs act_mode 'static'")
        ts = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1)
        am = torch.as_tensor(absmax, dtype=torch.float32).reshape(-1)
        order = torch.argsort(ts)
        self.act_timesteps, self.act_absmax = ts[order].clone(), am[order].clone()

    def static_scale(self, qmax: int) -> float:
        """The calibrated scale for the current timestep (see `timestep_context`).

        Timesteps between calibrated ones use the nearest calibrated timestep; a batch mixing timesteps
        uses the widest of their ranges; outside any context, the widest calibrated range."""
        absmax = self.act_absmax.cpu()
        if absmax.numel() == 0 or not bool((absmax > 0).any()):
            raise RuntimeError("static activation ranges are not calibrated; quantize with `diffpro quantize --act-mode static` or call set_static_ranges")
        ts = _TIMESTEPS.get()
        if ts is None:
            return float(absmax.max()) / qmax
        return float(absmax[_nearest(self.act_timesteps.cpu(), ts)].max()) / qmax

    # -- execution ----------------------------------------------------------------------------

    def prepare(self, device: torch.device | str = "cpu") -> "_QuantBase":
        """Build the kernel's runtime state (e.g. oneDNN prepacked weights) for `device` now."""
        device = torch.device(device)
        if self.integers_released:
            packed_for = self._group.device if self._group is not None else self._kernel_device
            if device != packed_for:
                self.int_weight()   # raises the inference-only error
            return self
        if self._group is not None:
            self._group.prepare(device)
            return self
        cls = kernels.select(self, device, self.prefer)
        self._kernel = cls([self], device)
        self._kernel_device = device
        self._kernel_label = kernels.describe(cls, self, self._kernel.act_qmax)
        return self

    def _forget_kernel(self) -> None:
        if self.integers_released:   # the packed kernel is all that is left: keep it
            return
        self._kernel = None
        if self._group is not None:
            self._group.kernel = None

    @property
    def kernel_name(self) -> str:
        """The kernel this layer runs (or would run on the CPU, if not prepared yet), for reports."""
        if self._compiled_lead is not None:
            return self._compiled_state["label"] + (f"+fused{len(self._compiled_state['sizes'])}" if self._group is not None else "")
        if self._group is not None and self._group.kernel is not None:   # this member's widths, not the lead's
            kernel = self._group.kernel
            return kernels.describe(type(kernel), self, kernel.act_qmax) + f"+fused{len(self._group.members)}"
        if self._kernel is not None:
            return self._kernel_label
        cls = kernels.select(self, torch.device("cpu"), self.prefer)
        qmax = kernels.cpu_act_qmax(self.weight_bits, self.group_size, self.pair_bounded) if cls.name.startswith("cpu-") else None
        return kernels.describe(cls, self, qmax)

    @property
    def act_qmax(self) -> int | None:
        """The activation grid of the prepared kernel (what a reference must use to match it)."""
        kernel = self._group.kernel if self._group is not None else self._kernel
        return None if kernel is None else kernel.act_qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_lead is not None:   # compiled.enable(): traceable ops for torch.compile
            from diffpro_cli.quant import compiled
            return compiled.forward(self, x, self.post_op)   # the activation in oneDNN's epilogue, or fused by inductor
        if torch.compiler.is_compiling():
            kernel = self._group.kernel if self._group is not None else self._kernel
            if getattr(kernel, "traceable", False) and self.act_mode != "static":
                return self._traced_forward(kernel, x)   # plain torch ops (the CUDA kernels): traced, no break
            return _eager_forward_opaque(self, x)    # a layer the compiled path leaves eager: an opaque call
        return self._eager_forward(x)

    def _traced_forward(self, kernel, x: torch.Tensor) -> torch.Tensor:
        """A prepared traceable kernel under torch.compile (a fused q/k/v member: groups.SharedInputGroup.traced)."""
        return call_kernel(kernel, self, x) if self._group is None else self._group.traced(self, x)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self._checked_shape:
            self._check_input(x)
            self._checked_shape = x.shape
        if self._group is not None:
            return self._group.run(self, x)
        if self._kernel is None or self._kernel_device != x.device:
            self.prepare(x.device)
        return call_kernel(self._kernel, self, x)

    def __deepcopy__(self, memo):
        """A copy that computes the same outputs. A prepared kernel is runtime state (oneDNN/fbgemm packed
        weights, which cannot be deep-copied): the copy drops it and packs its own from its copied integers
        on its first call. Where the integers were released (inference-only load) the packed kernel is all
        that is left; it is immutable, so the copy shares it instead. Packed buffers of the compiled path
        (compiled.attach) are shared for the same reason."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for b in self._buffers.values():
            if b is not None and b.is_mkldnn:
                memo[id(b)] = b
        state = dict(self.__dict__)
        if self.integers_released:
            if self._kernel is not None:   # (a fused member's kernel is its group's: groups.py)
                memo[id(self._kernel)] = self._kernel
        else:
            state.update(_kernel=None, _kernel_device=None, _kernel_label="")
        new.__setstate__(copy.deepcopy(state, memo))
        return new

    def _apply(self, fn, recurse=True):   # .to()/.cuda(): runtime state is rebuilt on the next call
        self._forget_kernel()
        return super()._apply(fn, recurse)

    def describe(self) -> dict:
        """The per-layer record written to diffpro.json."""
        return {"type": self.kind, "weight_bits": self.weight_bits, "layout": layout_name(self.weight_bits),
                "group_size": self.group_size, "weight_shape": list(self.weight_shape),
                "act_bits": 16 if self.act_mode == "none" else 8, "act_mode": self.act_mode,
                "act_timesteps": int(self.act_timesteps.numel()) if self.act_mode == "static" else 0,
                "bias": self.bias is not None, "kernel": self.kernel_name, "prefer": self.prefer,
                "pair_bounded": self.pair_bounded, **self._extra_config()}

    def _extra_config(self) -> dict:
        return {}

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise, naming the sizes, for an input the float layer refuses too (the kernels would fail inside oneDNN/fbgemm)."""


@torch.compiler.disable
def _eager_forward_opaque(layer: _QuantBase, x: torch.Tensor) -> torch.Tensor:
    return layer._eager_forward(x)


class QuantLinear(_QuantBase):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 act_mode: str = "dynamic", group_size: int | None = None, num_act_timesteps: int = 0, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_state(out_features, in_features, bias, weight_bits, act_mode, group_size, num_act_timesteps, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_mode: str = "dynamic", group_size: int | None = None,
                   hessian: torch.Tensor | None = None) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits, act_mode, group_size)
        layer.set_weight(linear.weight, linear.bias, hessian)
        return layer

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise RuntimeError(f"QuantLinear({self.in_features} → {self.out_features}) takes inputs of {self.in_features} features "
                               f"(the last dimension); got one of shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits}, act={self.act_mode}, group={self.group_size}"


class QuantConv2d(_QuantBase):
    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", weight_bits: int = 8, act_mode: str = "dynamic",
                 group_size: int | None = None, num_act_timesteps: int = 0, device=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        in_flat = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._init_state(out_channels, in_flat, bias, weight_bits, act_mode, group_size, num_act_timesteps, device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_mode: str = "dynamic", group_size: int | None = None) -> "QuantConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None, conv.padding_mode, weight_bits, act_mode, group_size)
        layer.set_weight(conv.weight, conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:   # unbatched [C, H, W], which nn.Conv2d accepts: every kernel takes [B, C, H, W]
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def _check_input(self, x: torch.Tensor) -> None:
        name = f"QuantConv2d({self.in_channels} → {self.out_channels})"
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise RuntimeError(f"{name} takes [B, {self.in_channels}, H, W] or [{self.in_channels}, H, W] inputs; got one of shape {tuple(x.shape)}")
        pad = (0, 0) if isinstance(self.padding, str) else self.padding   # ("same" fits any size)
        size, reach = [x.shape[2 + i] + 2 * pad[i] for i in (0, 1)], [self.dilation[i] * (self.kernel_size[i] - 1) + 1 for i in (0, 1)]
        if self.padding != "same" and (size[0] < reach[0] or size[1] < reach[1]):
            raise RuntimeError(f"{name}: the padded input ({size[0]}x{size[1]}) is smaller than the kernel's reach "
                               f"({reach[0]}x{reach[1]}); got an input of shape {tuple(x.shape)}")

    def float_conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The float convolution with this layer's geometry (fallback kernel and reference)."""
        if self.padding_mode != "zeros":   # "same"/"valid" padding too: the pad amounts as nn.Conv2d takes them
            _, extra = _explicit_padding(self)
            return F.conv2d(_pad(self, x, extra), w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _extra_config(self) -> dict:
        return {"conv": {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                         "stride": list(self.stride), "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                         "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode}}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"w{self.weight_bits}, act={self.act_mode}, group={self.group_size}")


class Int8Embedding(nn.Module):
    """A lookup table kept as int8 rows with one float scale per row, dequantized per looked-up row
    (the same values as dequantizing the whole table first). Inference-only loads use it for class
    embeddings: diffusers' DiT-XL/2 has 28 tables of 1001×1152, 129 MB in float32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.reshape(-1, 1).float())
        self.num_embeddings, self.embedding_dim = qweight.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # in the scales' dtype: float32 as loaded, bf16/fp16 after net.to(dtype), as a float table would be
        return F.embedding(idx, self.qweight).to(self.scale.dtype) * F.embedding(idx, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------


def empty_from_record(record: dict, device=None, source: str = "diffpro.json") -> _QuantBase:
    """An uninitialised quant layer from its diffpro.json record (the checkpoint loader fills it). A
    record no layer can be built from is a corrupt file, not a bad option: one InputError naming
    `source` (the file and layer)."""
    try:
        return _layer_from_record(record, device)
    except (UsageError, KeyError, TypeError, ValueError) as exc:
        problem = f"field {exc} is missing" if isinstance(exc, KeyError) else str(exc).split(";")[0]
        raise InputError(f"{source}: {problem} (a corrupt layer record); re-run `diffpro quantize` to write the checkpoint again") from None


def _layer_from_record(record: dict, device) -> _QuantBase:
    if not isinstance(record, dict):
        raise TypeError(f"the record is a {type(record).__name__}, not an object")
    if record["type"] not in ("linear", "conv2d") or record["act_mode"] not in kernels.ACT_MODES:
        raise ValueError(f"type {record['type']!r} / act_mode {record['act_mode']!r} is not one diffpro writes")
    common = dict(weight_bits=record["weight_bits"], act_mode=record["act_mode"], group_size=record.get("group_size"),
                  num_act_timesteps=record.get("act_timesteps", 0), device=device)
    if record["type"] == "linear":
        out_f, in_f = record["weight_shape"]
        layer = QuantLinear(in_f, out_f, bias=record["bias"], **common)
    else:
        c = record["conv"]
        padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        layer = QuantConv2d(c["in_channels"], c["out_channels"], tuple(c["kernel_size"]), tuple(c["stride"]), padding,
                            tuple(c["dilation"]), c["groups"], record["bias"], c["padding_mode"], **common)
    prefer = record.get("prefer")   # the kernel the plan measured fastest; ignored where it is not a candidate
    layer.prefer = prefer if prefer in kernels.KERNELS else None
    layer.pair_bounded = bool(record.get("pair_bounded", False))
    return layer


def quantize_module(module: nn.Module, weight_bits: int, act_bits: int = 8, act_mode: str = "dynamic",
                    group_size: int | None = None, static_absmax: float | None = None) -> nn.Module:
    """The integer version of one nn.Linear / nn.Conv2d, kernel prepared; weight_bits 16 returns it as is.

    act_mode "static" needs calibrated ranges: pass `static_absmax` (one range for every timestep, handy
    for timing) or call `set_static_ranges` before the first call.
    """
    if weight_bits >= 16:
        return module
    mode = normalise_act(act_bits, act_mode)
    if isinstance(module, nn.Linear):
        layer = QuantLinear.from_float(module, weight_bits, mode, group_size)
    elif isinstance(module, nn.Conv2d):
        layer = QuantConv2d.from_float(module, weight_bits, mode, group_size)
    else:
        raise UsageError(f"{type(module).__name__}: only nn.Linear and nn.Conv2d can be quantized")
    if mode == "static" and static_absmax is not None:
        layer.set_static_ranges([0], [static_absmax])
    device = module.weight.device
    layer.to(device)
    if mode != "static" or static_absmax is not None:
        layer.prepare(device)
    return layer
