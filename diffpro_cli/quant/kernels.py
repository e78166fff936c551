"""Kernel registry: (op, device, weight bits, activation mode) → the implementation that runs a layer.

A kernel is prepared once from the stored integers of one layer, or of several layers that always see
the same input (attention q/k/v, fused into one GEMM), and is then called with float activations.

Activation modes (all int8, symmetric unless said; "per call" = per denoising step, since every step is
its own forward pass, so every dynamic mode follows the timestep by construction):
  * "dynamic": one scale per input tensor, found at every call. CPU: fbgemm's fused
    `quantized.linear_dynamic` (asymmetric u8 range, the range search, quantization, int8 GEMM and
    dequantization in ONE op). The fast default: see docs/quantization.md for the measurements.
  * "dynamic-token": one scale per token (row of the [tokens, features] input), found at every call.
    Most accurate; costs ~5 extra elementwise passes per layer (oneDNN u8×s8 matmul with zero point 128
    and scale 1, then y = b + s_token·(Σ q_x q_w s_w) in one fused multiply-add).
  * "static": one calibrated scale per timestep, stored in the checkpoint (layers.timestep_context);
    CPU: fbgemm's fused quantize→GEMM→dequantize op, one call per layer.
  * "none": weight-only, float activations.
Conv2d (native oneDNN int8 convolution, channels-last inside) uses one scale per sample for both dynamic
modes: a convolution mixes neighbouring pixels, so a per-pixel scale cannot be factored out of it.

Weights of any width ≤ 8 bits run on the int8 grid (4-bit storage → W4A8 compute); group-wise scales
are folded onto one int8 grid per output channel at prepare time (formats.fold_to_channel_grid).
Each kernel says which activation scheme it computes (`act_scheme`), so tests pick the matching
reference; rounding may differ from the reference only for values within float rounding of a half step
(reference.rounding_ambiguity), which reference.kernel_tolerance accounts for.

Non-finite inputs: a token (Linear) or sample (Conv2d) holding a NaN or ±inf comes out NaN (the
weight-only path: as the float layer computes it), never finite; the other tokens and samples compute
as they would without it (a per-tensor scale is found from the finite rows). Kernels whose scale cannot
see a non-finite value (fbgemm, the static ones) zero those rows first and mark them after
(kernel_common.split_nonfinite_rows / mark_rows): one sum over the input per call.

CUDA kernels (`torch._int_mm`, tinygemm int4 weight-only, FP8 `_scaled_mm`) live in kernels_cuda.py,
the shared pieces (registry dict, scales, stacked weights, conv padding) in kernel_common.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F

from diffpro_cli.quant import kernels_cuda  # noqa: F401  (registers the CUDA kernels)
from diffpro_cli.quant.formats import STORAGE_BITS, dequantize_weight
from diffpro_cli.quant.kernel_common import (
    KERNELS,
    _explicit_padding,
    _pad,
    _stacked_weights,
    mark_rows,
    register,
    row_scales,
    sample_scales,
    split_nonfinite_rows,
    tensor_scale,
)

ACT_MODES = ("dynamic", "dynamic-token", "static", "none")
ACT_ZERO_POINT = {127: 128, 63: 64}   # u8 zero point for a symmetric grid of ±qmax


# ISA caps a user can set so that a VNNI CPU runs the AVX2 integer code (to test AVX2 numerics anywhere).
# The libraries read them once, at their first use in the process; we read them the same way.
#   oneDNN (`ONEDNN_MAX_CPU_ISA`, legacy `DNNL_MAX_CPU_ISA`): every level from AVX2_VNNI up has VNNI.
#   fbgemm (`FBGEMM_ENABLE_INSTRUCTIONS`): AVX512_E1 / AVX512_E1_256 are its VNNI levels; unknown values
#     are ignored by fbgemm, so they are ignored here too.
#   ATen (`ATEN_CPU_CAPABILITY`): has no VNNI level and does not pick the integer GEMMs, but default /
#     avx2 is how torch is told to behave as an AVX2 CPU, so it is honoured as that request.
_ISA_CAPS_WITHOUT_VNNI = {
    "ONEDNN_MAX_CPU_ISA": {"SSE41", "AVX", "AVX2", "AVX512_CORE"},
    "DNNL_MAX_CPU_ISA": {"SSE41", "AVX", "AVX2", "AVX512_CORE"},
    "FBGEMM_ENABLE_INSTRUCTIONS": {"AVX2", "AVX512", "AVX512_256"},
    "ATEN_CPU_CAPABILITY": {"DEFAULT", "AVX2"},
}


def isa_cap_without_vnni() -> str | None:
    """The first environment variable (as "NAME=value") that caps the integer kernels' ISA below VNNI."""
    for name, levels in _ISA_CAPS_WITHOUT_VNNI.items():
        value = os.environ.get(name, "").strip().upper()
        if value in levels:
            return f"{name}={os.environ[name].strip()}"
    return None


@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """VNNI/AMX multiply u8×s8 straight into 32 bits; plain AVX2 uses vpmaddubsw, whose int16 pair sums
    saturate (2·255·127 > 32767) when weights use the full int8 range. False when /proc/cpuinfo lacks
    the flags OR an ISA cap (isa_cap_without_vnni) makes fbgemm/oneDNN run their pre-VNNI code.
    Cached: call `cpu_has_vnni.cache_clear()` after changing those variables in-process (the libraries
    themselves only read them at their first use, so real kernels need a fresh process)."""
    if isa_cap_without_vnni() is not None:
        return False
    return any(flag in _cpu_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)
def cpu_has_amx_int8() -> bool:
    """AMX int8 tiles that oneDNN uses (fbgemm does not): the amx_int8 flag and no oneDNN ISA cap below
    AMX. Measured on an Intel Xeon with AMX, 2 threads (docs/results.md, session 17): oneDNN's int8
    Linear 1.4-2.3x fbgemm's at DiT-XL/2's widths (not at the built-ins': AMX_MIN_WEIGHTS). Cached like
    cpu_has_vnni."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip().upper()
        if cap and cap != "ALL" and "AMX" not in cap:
            return False
    return "amx_int8" in _cpu_flags()


# Below this many weights fbgemm stays first on AMX too: the built-in DiT's 192-wide layers ran its whole
# forward at 1.04x fp32 on oneDNN against 1.35x on fbgemm (same Xeon), DiT-XL/2's (≥ 1.3M) 1.4-2.3x faster.
AMX_MIN_WEIGHTS = 1 << 20

SATURATION_FREE_QMAX = 64   # |q_w| ≤ 64: 2·255·64 = 32640 fits vpmaddubsw's int16 pair sum


def cpu_act_qmax(weight_bits: int, group_size: int | None = None, pair_bounded: bool = False) -> int:
    """Activation grid of the CPU kernels for a layer of `weight_bits` (group-wise if `group_size`).

    ±127 with VNNI/AMX. Without VNNI (AVX2's vpmaddubsw sums u8·s8 pairs in saturating int16) the grid
    depends on the integer weights the GEMM multiplies: per-channel weights of ≤ 6 bits (|q| ≤ 31:
    2·255·31 < 32767) cannot saturate and keep ±127; 8-bit weights, and group-wise weights of any width
    (folded onto a full ±127 per-channel grid, formats.fold_to_channel_grid), get ±63 (7 bits).
    Measured with fbgemm and oneDNN capped to AVX2 (torch 2.14.1): per-channel W4/W6 with ±127 match the
    exact integer result to 1e-7; W8, and W4/W6 with group size 32, miss it by up to 0.2 relative
    (tests/test_kernels_cpu.py). Callers that do not know the group size get the per-channel answer."""
    if cpu_has_vnni() or pair_bounded:   # pair-bounded weights (layers.bound_pairs) cannot saturate either
        return 127
    folded_max = 127 if weight_bits >= 8 or group_size else 2 ** (weight_bits - 1) - 1
    return 127 if folded_max <= SATURATION_FREE_QMAX else 63


def act_bits_of(qmax: int) -> int:
    return 8 if qmax == 127 else 7


def quantize_u8(x: torch.Tensor, scale, qmax: int, clamp: bool) -> torch.Tensor:
    """floor(x/scale + zp + 1/2) as uint8: two passes over x. Dynamic scales bound |x/scale| ≤ qmax;
    calibrated (static) ones need the clamp."""
    zp = ACT_ZERO_POINT[qmax]
    if not torch.is_tensor(scale):
        scale = torch.tensor(scale, dtype=x.dtype)
    v = torch.addcdiv(torch.tensor(zp + 0.5, dtype=x.dtype), x, scale)
    if clamp:
        v.clamp_(zp - qmax, zp + qmax + 0.5)
    return v.to(torch.uint8)


@contextlib.contextmanager
def _quant_engine(name: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _group_qmax(layers) -> int:
    return min(cpu_act_qmax(layer.weight_bits, layer.group_size, getattr(layer, "pair_bounded", False)) for layer in layers)


def quantize_u8_fast(x: torch.Tensor, scale: float, qmax: int) -> torch.Tensor:
    """round(x/scale) + zp as uint8 for a float32 x and a scalar scale that bounds |x/scale| ≤ qmax:
    torch's fused quantize (one vectorised pass) and a byte copy out of the quantized tensor, ~2x
    faster than quantize_u8's float passes here (session 10: 29 vs 47 µs at 512×192)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the quantized-tensor API is deprecated; we only use its kernel
        return torch.quantize_per_tensor(x, scale, ACT_ZERO_POINT[qmax], torch.quint8).int_repr()


@register
class CpuOnednnLinear:
    """Int8 GEMM (oneDNN matmul, u8 activations × s8 weights → s32, dequantized inside).

    With one scale per tensor ("dynamic", "static") oneDNN applies the activation scale, the weight
    scales and the bias in its epilogue, and also a following GELU (`layer.post_op`, set by
    layers.fuse_activations) and the output's cast: it writes bf16 directly in a bf16 model
    (`low_precision_io`), so that an integer layer costs no float32 round trip there."""

    name = "cpu-onednn-int8"
    low_precision_io = True   # takes bf16/fp16 inputs and returns the input's dtype (layers.call_kernel)

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def __init__(self, layers, device: torch.device):
        q8, s8, bias = _stacked_weights(layers)
        self.w = torch.ops.onednn.qlinear_prepack(q8, None)
        self.w_scale, self.w_zp, self.bias = s8, torch.zeros(s8.numel(), dtype=torch.long), bias
        self.act_qmax = _group_qmax(layers)
        self.out_features = s8.numel()

    @staticmethod
    def fuses(layer) -> bool:
        """Whether this kernel applies `layer.post_op` itself (in oneDNN's epilogue)."""
        return layer.post_op in POST_OP_ALGORITHMS and layer.act_mode != "dynamic-token"

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        qmax, zp = self.act_qmax, ACT_ZERO_POINT[self.act_qmax]
        if layer.act_mode == "dynamic-token":
            scale = row_scales(x2, qmax)
            xq = quantize_u8(x2, scale, qmax, clamp=False)
            y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, zp, self.w, self.w_scale, self.w_zp, None,
                                                   1.0, 0, torch.float32, "none", [], "")
            y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
            return y.reshape(*shape[:-1], self.out_features).to(dtype)
        # one scale for the whole input: oneDNN applies it, the bias and the post-op, and writes `dtype`
        if layer.act_mode == "static":
            x2, bad = split_nonfinite_rows(x2)
            scale = layer.static_scale(qmax)
            xq = quantize_u8(x2, scale, qmax, clamp=True)
        else:
            scale, bad = tensor_scale(x2, qmax), None
            if not math.isfinite(scale):   # a NaN/inf somewhere (the max found it at no extra cost)
                x2, bad = split_nonfinite_rows(x2, known=True)
                scale = tensor_scale(x2, qmax)
            xq = quantize_u8_fast(x2, scale, qmax)
        post, algorithm = ("gelu", POST_OP_ALGORITHMS[layer.post_op]) if self.fuses(layer) else ("none", "")
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
        y = torch.ops.onednn.qlinear_pointwise(xq, scale, zp, self.w, self.w_scale, self.w_zp, self.bias,
                                               1.0, 0, out_dtype, post, [], algorithm)
        return mark_rows(y, bad).reshape(*shape[:-1], self.out_features).to(dtype)

    def act_scheme(self, layer) -> str:
        return {"dynamic-token": "token", "dynamic": "tensor"}.get(layer.act_mode, "static")


POST_OP_ALGORITHMS = {"gelu": "none", "gelu-tanh": "tanh"}   # layers.POST_OPS names → oneDNN's gelu algorithm


@register
class CpuFbgemmLinear:
    """One fused op per layer through fbgemm (torch's quantized-tensor API):
    "dynamic": quantized.linear_dynamic — per-tensor asymmetric u8 range found, quantized, int8 GEMM,
    dequantized with the bias, all inside one call; "static": the same with the calibrated scale
    (linear_with_input_q_dq_qweight_dq_output_fp32). The API is deprecated in torch; where it is gone the
    registry falls back to the oneDNN kernel."""

    name = "cpu-fbgemm-int8"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        if device.type != "cpu" or _fbgemm_engine() is None or not hasattr(torch.ops.quantized, "linear_dynamic"):
            return False
        if layer.act_mode == "static":   # fbgemm clamps static activations to the full u8 range
            return cpu_act_qmax(layer.weight_bits, layer.group_size, getattr(layer, "pair_bounded", False)) == 127 and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
        return layer.act_mode == "dynamic"

    def __init__(self, layers, device: torch.device):
        q8, s8, bias = _stacked_weights(layers)
        with warnings.catch_warnings(), _quant_engine(_fbgemm_engine()):
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q8, s8.double(), torch.zeros(s8.numel(), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.act_qmax = _group_qmax(layers)
        self.reduce_range = self.act_qmax != 127   # 7-bit activations where u8×s8 could saturate
        self.out_features = s8.numel()

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2, bad = split_nonfinite_rows(x.reshape(-1, shape[-1]).float())
        if layer.act_mode == "static":
            scale = layer.static_scale(self.act_qmax)
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, scale, ACT_ZERO_POINT[self.act_qmax], self.packed)
        else:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, self.reduce_range)
        return mark_rows(y, bad).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def act_scheme(self, layer) -> str:
        return "static" if layer.act_mode == "static" else "tensor-asym"


@functools.lru_cache(maxsize=None)
def _fbgemm_engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), None)


@register
class CpuOnednnConv2d:
    """Native int8 convolution (oneDNN, u8 × s8 → s32 → fp32), channels-last inside."""

    name = "cpu-onednn-int8-conv"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")

    def __init__(self, layers, device: torch.device):
        (layer,) = layers
        q8, s8, bias = _stacked_weights(layers)
        self.act_qmax = _group_qmax(layers)
        self.padding, self.extra_pad = _explicit_padding(layer)
        self.stride, self.dilation, self.groups = list(layer.stride), list(layer.dilation), layer.groups
        self.w = torch.ops.onednn.qconv_prepack(q8.reshape(layer.weight_shape).contiguous(), s8, 1.0, ACT_ZERO_POINT[self.act_qmax],
                                                self.stride, self.padding, self.dilation, self.groups, None)
        self.w_scale, self.w_zp = s8, torch.zeros(s8.numel(), dtype=torch.long)
        self.bias = None if bias is None else bias.view(1, -1, 1, 1)

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = _pad(layer, x.float(), self.extra_pad)
        qmax, zp = self.act_qmax, ACT_ZERO_POINT[self.act_qmax]
        static = layer.act_mode == "static"
        # (a per-sample scale is NaN/inf already where its sample holds one, and so is that sample's output)
        x, bad = split_nonfinite_rows(x) if static else (x, None)
        scale = layer.static_scale(qmax) if static else sample_scales(x, qmax)
        xq = quantize_u8(x, scale, qmax, clamp=static).contiguous(memory_format=torch.channels_last)
        y = torch.ops.onednn.qconv2d_pointwise(xq, 1.0, zp, self.w, self.w_scale, self.w_zp, None, self.stride, self.padding,
                                               self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        return mark_rows(y, bad).contiguous().to(dtype)

    def act_scheme(self, layer) -> str:
        return "static" if layer.act_mode == "static" else "sample"


@register
class DequantFloat:
    """Weight-only fallback: weights dequantized once to float, float math. No integer compute and no
    speed-up; used for act_mode "none" on CPU and wherever no integer kernel fits the layer."""

    name = "dequant-float"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return True

    def __init__(self, layers, device: torch.device):
        ws = [dequantize_weight(layer.int_weight(), layer.weight_scale.cpu()).reshape(layer.weight_shape) for layer in layers]
        self.w = torch.cat(ws).to(device)
        _, _, bias = _stacked_weights(layers) if len(layers) > 1 else (None, None, layers[0].bias)
        self.bias = None if bias is None else bias.detach().float().to(device)
        self.act_qmax = None

    any_dtype = True   # float math in the input's dtype (bf16/fp16 under a model's compute_dtype)
    traceable = True   # plain torch ops: torch.compile traces a prepared layer (layers._traced_forward)

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.w.dtype:
            w, b = self.w, self.bias
        else:   # one copy per compute dtype, made once: a cast per call would cost a pass over the weights
            cast = self.__dict__.get("_cast", {})
            if x.dtype in cast:
                w, b = cast[x.dtype]
            elif torch.compiler.is_compiling():   # no Python state written inside a graph: cast in it
                w, b = self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            else:
                w, b = self.__dict__.setdefault("_cast", {}).setdefault(
                    x.dtype, (self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)))
        if layer.kind == "conv2d":
            return layer.float_conv(x, w, b)
        return F.linear(x, w, b)

    def act_scheme(self, layer) -> str:
        return "float"


# ---------------------------------------------------------------------------------------------
# The registry table and the selection rule
# ---------------------------------------------------------------------------------------------


def _build_table() -> dict[tuple[str, str, int, str], list[str]]:
    """Kernels in order of preference for every (op, device, weight bits, activation mode)."""
    table = {}
    for bits in STORAGE_BITS:
        table[("linear", "cpu", bits, "dynamic")] = ["cpu-fbgemm-int8", "cpu-onednn-int8", "dequant-float"]
        table[("linear", "cpu", bits, "dynamic-token")] = ["cpu-onednn-int8", "dequant-float"]
        table[("linear", "cpu", bits, "static")] = ["cpu-fbgemm-int8", "cpu-onednn-int8", "dequant-float"]
        for mode in ("dynamic", "dynamic-token", "static"):
            table[("conv2d", "cpu", bits, mode)] = ["cpu-onednn-int8-conv", "dequant-float"]
            table[("linear", "cuda", bits, mode)] = ["cuda-int8-intmm", "dequant-float"]
            table[("conv2d", "cuda", bits, mode)] = ["cuda-int8-im2col-intmm", "dequant-float"]
        for op in ("linear", "conv2d"):
            table[(op, "cpu", bits, "none")] = ["dequant-float"]
        table[("linear", "cuda", bits, "none")] = (["cuda-int4-tinygemm"] if bits <= 4 else []) + ["dequant-float"]
        table[("conv2d", "cuda", bits, "none")] = ["dequant-float"]
    table[("linear", "cuda", 8, "dynamic-token")].append("cuda-fp8")
    return table


REGISTRY = _build_table()
OPT_IN = {"cuda-fp8"}   # listed, but only run when a layer asks for it by name


def candidates(op: str, device_type: str, bits: int, act_mode: str) -> list[str]:
    return REGISTRY.get((op, device_type, bits, act_mode), ["dequant-float"])


def select(layer, device: torch.device, prefer: str | None = None) -> type:
    """The first usable kernel for `layer` on `device` (the preferred name first, if listed)."""
    names = candidates(layer.kind, device.type, layer.weight_bits, layer.act_mode)
    if prefer is None and getattr(layer, "post_op", None) in POST_OP_ALGORITHMS and "cpu-onednn-int8" in names:
        prefer = "cpu-onednn-int8"   # fbgemm's fused op cannot take an epilogue: the GELU would be its own pass
    if (prefer is None and device.type == "cpu" and "cpu-onednn-int8" in names and cpu_has_amx_int8()
            and math.prod(layer.weight_shape) >= AMX_MIN_WEIGHTS):
        prefer = "cpu-onednn-int8"   # AMX int8: oneDNN's tiles beat fbgemm's AVX-512 (a plan's measured choice still wins)
    order = ([prefer] if prefer in names else []) + [n for n in names if n not in OPT_IN]
    for name in order:
        if KERNELS[name].usable(layer, device):
            return KERNELS[name]
    return DequantFloat


def describe(kernel_cls: type, layer, act_qmax: int | None) -> str:
    """Report name: kernel plus the precisions it computes in, e.g. "cpu-onednn-int8:w4a8-dynamic"
    ("+gelu" where the kernel applies the layer's following activation itself)."""
    if act_qmax is None:
        act = "a16" if layer.act_mode == "none" or kernel_cls is DequantFloat else "a8"
    else:
        act = f"a{act_bits_of(act_qmax)}"
    fused = getattr(kernel_cls, "fuses", None)
    post = getattr(layer, "post_op", None)
    suffix = f"+{post}" if post and fused is not None and fused(layer) else ""
    return f"{kernel_cls.name}:w{layer.weight_bits}{act}-{layer.act_mode}{suffix}"
