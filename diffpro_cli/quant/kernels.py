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

CUDA kernels (`torch._int_mm`, tinygemm int4 weight-only, FP8 `_scaled_mm`) follow the documented
contracts of those ops but have NOT run on a GPU in this project (see docs/quantization.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from diffpro_cli.quant.formats import STORAGE_BITS, dequantize_weight, fold_to_channel_grid

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
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


SATURATION_FREE_QMAX = 64   # |q_w| ≤ 64: 2·255·64 = 32640 fits vpmaddubsw's int16 pair sum


def cpu_act_qmax(weight_bits: int, group_size: int | None = None) -> int:
    """Activation grid of the CPU kernels for a layer of `weight_bits` (group-wise if `group_size`).

    ±127 with VNNI/AMX. Without VNNI (AVX2's vpmaddubsw sums u8·s8 pairs in saturating int16) the grid
    depends on the integer weights the GEMM multiplies: per-channel weights of ≤ 6 bits (|q| ≤ 31:
    2·255·31 < 32767) cannot saturate and keep ±127; 8-bit weights, and group-wise weights of any width
    (folded onto a full ±127 per-channel grid, formats.fold_to_channel_grid), get ±63 (7 bits).
    Measured with fbgemm and oneDNN capped to AVX2 (torch 2.14.1): per-channel W4/W6 with ±127 match the
    exact integer result to 1e-7; W8, and W4/W6 with group size 32, miss it by up to 0.2 relative
    (tests/test_kernels_cpu.py). Callers that do not know the group size get the per-channel answer."""
    if cpu_has_vnni():
        return 127
    folded_max = 127 if weight_bits >= 8 or group_size else 2 ** (weight_bits - 1) - 1
    return 127 if folded_max <= SATURATION_FREE_QMAX else 63


def act_bits_of(qmax: int) -> int:
    return 8 if qmax == 127 else 7


def row_scales(x2d: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-token symmetric scale [M, 1] (same arithmetic as reference.fake_quant_act_per_token)."""
    return x2d.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(qmax)


def tensor_scale(x: torch.Tensor, qmax: int) -> float:
    """One symmetric scale for the whole input."""
    return max(float(torch.linalg.vector_norm(x, float("inf"))), 1e-12) / qmax


def sample_scales(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-sample symmetric scale [B, 1, 1, 1] for NCHW input."""
    return x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min_(1e-12).div_(qmax)


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


def _stacked_weights(layers):
    """Per-channel int8 weights, scales and biases of layers sharing one input, concatenated by rows."""
    qs, ss, bs = [], [], []
    for layer in layers:
        q8, s8 = fold_to_channel_grid(layer.int_weight(), layer.weight_scale.cpu())
        qs.append(q8)
        ss.append(s8)
        bs.append(layer.bias.detach().float().cpu() if layer.bias is not None else torch.zeros(s8.numel()))
    bias = (torch.cat(bs) if len(bs) > 1 else bs[0]) if any(layer.bias is not None for layer in layers) else None
    if len(qs) == 1:   # no copy for a single layer (weights can be large)
        return qs[0].contiguous(), ss[0].contiguous(), bias
    return torch.cat(qs).contiguous(), torch.cat(ss).contiguous(), bias


def _group_qmax(layers) -> int:
    return min(cpu_act_qmax(layer.weight_bits, layer.group_size) for layer in layers)


KERNELS: dict[str, type] = {}


def register(cls):
    KERNELS[cls.name] = cls
    return cls


# Every kernel class: `name`, `usable(layer, device)`, `__init__(layers, device)` (prepare),
# `__call__(layer, x)` (layer = the first of `layers`, for its activation mode and static scales) and
# `act_qmax` (the activation grid; None for float activations).


@register
class CpuOnednnLinear:
    """Int8 GEMM (oneDNN matmul, u8 activations × s8 weights → s32, dequantized inside)."""

    name = "cpu-onednn-int8"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def __init__(self, layers, device: torch.device):
        q8, s8, bias = _stacked_weights(layers)
        self.w = torch.ops.onednn.qlinear_prepack(q8, None)
        self.w_scale, self.w_zp, self.bias = s8, torch.zeros(s8.numel(), dtype=torch.long), bias
        self.act_qmax = _group_qmax(layers)
        self.out_features = s8.numel()

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        qmax, zp = self.act_qmax, ACT_ZERO_POINT[self.act_qmax]
        if layer.act_mode == "dynamic-token":
            scale = row_scales(x2, qmax)
            xq = quantize_u8(x2, scale, qmax, clamp=False)
            y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, zp, self.w, self.w_scale, self.w_zp, None,
                                                   1.0, 0, torch.float32, "none", [], "")
            y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        else:   # one scale for the whole input: oneDNN applies it and the bias
            static = layer.act_mode == "static"
            scale = layer.static_scale(qmax) if static else tensor_scale(x2, qmax)
            xq = quantize_u8(x2, scale, qmax, clamp=static)
            y = torch.ops.onednn.qlinear_pointwise(xq, scale, zp, self.w, self.w_scale, self.w_zp, self.bias,
                                                   1.0, 0, torch.float32, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def act_scheme(self, layer) -> str:
        return {"dynamic-token": "token", "dynamic": "tensor"}.get(layer.act_mode, "static")


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
            return cpu_act_qmax(layer.weight_bits, layer.group_size) == 127 and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
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
        x2 = x.reshape(-1, shape[-1]).float()
        if layer.act_mode == "static":
            scale = layer.static_scale(self.act_qmax)
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, scale, ACT_ZERO_POINT[self.act_qmax], self.packed)
        else:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, self.reduce_range)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def act_scheme(self, layer) -> str:
        return "static" if layer.act_mode == "static" else "tensor-asym"


@functools.lru_cache(maxsize=None)
def _fbgemm_engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), None)


def _explicit_padding(layer) -> tuple[list[int], list[int] | None]:
    """(conv padding, extra F.pad amounts or None): "same"/"valid" and non-zero padding modes become an
    explicit pad, so the integer conv only ever sees symmetric zero padding."""
    kh, kw = layer.kernel_size
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [0, 0], None
        th, tw = layer.dilation[0] * (kh - 1), layer.dilation[1] * (kw - 1)
        return [0, 0], [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    if layer.padding_mode != "zeros":
        ph, pw = layer.padding
        return [0, 0], [pw, pw, ph, ph]
    return list(layer.padding), None


def _pad(layer, x: torch.Tensor, extra: list[int] | None) -> torch.Tensor:
    if extra is None:
        return x
    zeros = layer.padding_mode == "zeros" or isinstance(layer.padding, str)
    return F.pad(x, extra, mode="constant" if zeros else layer.padding_mode)


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
        scale = layer.static_scale(qmax) if static else sample_scales(x, qmax)
        xq = quantize_u8(x, scale, qmax, clamp=static).contiguous(memory_format=torch.channels_last)
        y = torch.ops.onednn.qconv2d_pointwise(xq, 1.0, zp, self.w, self.w_scale, self.w_zp, None, self.stride, self.padding,
                                               self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        return y.contiguous().to(dtype)

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

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        w = self.w.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if layer.kind == "conv2d":
            return layer.float_conv(x, w, b)
        return F.linear(x, w, b)

    def act_scheme(self, layer) -> str:
        return "float"


# ---------------------------------------------------------------------------------------------
# CUDA: UNVERIFIED (written without a GPU; see docs/quantization.md)
# ---------------------------------------------------------------------------------------------


def _int8_rows(x2: torch.Tensor, scale) -> torch.Tensor:
    return torch.round(x2.float() / scale).clamp_(-127, 127).to(torch.int8)


def _int_mm(a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """torch._int_mm needs more than 16 rows: pad small batches (adaLN inputs have one row per sample)."""
    m = a.shape[0]
    if m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
    return torch._int_mm(a.contiguous(), bt)[:m]


@register
class CudaIntMmLinear:
    """INT8 tensor cores via torch._int_mm (cuBLASLt): per-token int8 activations × int8 weights → int32."""

    name = "cuda-int8-intmm"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return device.type == "cuda" and layer.in_flat % 8 == 0 and layer.weight_shape[0] % 8 == 0

    def __init__(self, layers, device: torch.device):
        q8, s8, bias = _stacked_weights(layers)
        self.wt = q8.to(device).t()                      # [K, N] column-major, the layout cuBLASLt wants
        self.w_scale = s8.to(device).view(1, -1)
        self.bias = None if bias is None else bias.to(device)
        self.act_qmax = 127
        self.out_features = s8.numel()

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.act_mode == "static":
            scale = torch.full((x2.shape[0], 1), layer.static_scale(127), device=x.device)
        elif layer.act_mode == "dynamic":
            scale = (x2.float().abs().amax().clamp_min(1e-12) / 127).expand(x2.shape[0], 1)
        else:
            scale = x2.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
        y = _int_mm(_int8_rows(x2, scale), self.wt).float() * (scale * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def act_scheme(self, layer) -> str:
        return {"dynamic-token": "token", "dynamic": "tensor"}.get(layer.act_mode, "static")


@register
class CudaIm2colIntMmConv2d:
    """Conv2d as im2col + torch._int_mm, one activation scale per sample."""

    name = "cuda-int8-im2col-intmm"

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return device.type == "cuda" and layer.groups == 1 and layer.in_flat % 8 == 0 and layer.out_channels % 8 == 0

    def __init__(self, layers, device: torch.device):
        (layer,) = layers
        q8, s8, bias = _stacked_weights(layers)
        self.wt = q8.to(device).t()
        self.w_scale = s8.to(device).view(1, 1, -1)
        self.bias = None if bias is None else bias.to(device)
        self.act_qmax = 127
        self.padding, self.extra_pad = _explicit_padding(layer)

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        x = _pad(layer, x, self.extra_pad)
        b, _, h, w = x.shape
        if layer.act_mode == "static":
            scale = torch.full((b, 1, 1, 1), layer.static_scale(127), device=x.device)
        else:
            scale = sample_scales(x.float(), 127)
        q = torch.round(x.float() / scale).clamp_(-127, 127)
        cols = F.unfold(q, layer.kernel_size, dilation=layer.dilation, padding=self.padding, stride=layer.stride)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)          # [B·L, C·kh·kw]
        acc = _int_mm(cols, self.wt).float().reshape(b, -1, self.wt.shape[1])
        y = acc * (scale.reshape(b, 1, 1) * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        oh = (h + 2 * self.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
        ow = (w + 2 * self.padding[1] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) // layer.stride[1] + 1
        return y.transpose(1, 2).reshape(b, -1, oh, ow).to(x.dtype)

    def act_scheme(self, layer) -> str:
        return "static" if layer.act_mode == "static" else "sample"


@register
class CudaInt4WeightOnly:
    """tinygemm int4 weight-only GEMM (torch._weight_int4pack_mm), bf16 activations (W4A16)."""

    name = "cuda-int4-tinygemm"
    GROUPS = (256, 128, 64, 32)

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        k = layer.in_flat
        groups = layer.weight_scale.shape[1]
        return (device.type == "cuda" and layer.kind == "linear" and layer.weight_bits <= 4 and k % 128 == 0
                and layer.weight_shape[0] % 8 == 0 and (groups == 1 or (k // groups) in CudaInt4WeightOnly.GROUPS))

    def __init__(self, layers, device: torch.device):
        (layer,) = layers
        q = layer.int_weight().to(torch.int32)                   # [N, K], values in [-8, 7]
        n, k = q.shape
        scale = layer.weight_scale.cpu().float()
        gsize = k // scale.shape[1]
        if gsize not in self.GROUPS:                             # per-channel: repeat the scale over groups of 128
            scale, gsize = scale.repeat_interleave(k // 128, dim=1), 128
        u = (q + 8).to(torch.uint8)                              # tinygemm dequantizes (u - 8)·scale + zero
        packed = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()     # [N, K/2], even columns in the high nibble
        self.w = torch.ops.aten._convert_weight_to_int4pack(packed.to(device), 8)
        self.sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(device=device, dtype=torch.bfloat16).contiguous()
        self.gsize = gsize
        self.bias = None if layer.bias is None else layer.bias.detach().to(device=device, dtype=torch.bfloat16)
        self.act_qmax = None
        self.out_features = n

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.w, self.gsize, self.sz)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def act_scheme(self, layer) -> str:
        return "float"


@register
class CudaFp8Linear:
    """FP8 e4m3 GEMM with row-wise scales via torch._scaled_mm (sm_89+: Ada, H100/H200).

    The int8 weight grid is re-rounded to e4m3 (3 mantissa bits), so this kernel is NOT bit-matched to
    the int8 reference; it runs only when asked for by name (layer.prefer = "cuda-fp8")."""

    name = "cuda-fp8"
    FP8_MAX = 448.0

    @staticmethod
    def usable(layer, device: torch.device) -> bool:
        return (device.type == "cuda" and layer.kind == "linear" and torch.cuda.get_device_capability(device) >= (8, 9)
                and layer.in_flat % 16 == 0 and layer.weight_shape[0] % 16 == 0)

    def __init__(self, layers, device: torch.device):
        q8, s8, bias = _stacked_weights(layers)
        w = dequantize_weight(q8, s8.view(-1, 1)).to(device)
        ws = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / self.FP8_MAX
        self.wt = (w / ws).to(torch.float8_e4m3fn).t()                 # [K, N] column-major
        self.w_scale = ws.t().float().contiguous()                       # [1, N]
        self.bias = None if bias is None else bias.to(device=device, dtype=torch.bfloat16)
        self.act_qmax = None
        self.out_features = s8.numel()

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        xs = x2.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / self.FP8_MAX
        xq = (x2 / xs).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.wt, scale_a=xs, scale_b=self.w_scale, bias=self.bias, out_dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def act_scheme(self, layer) -> str:
        return "fp8-token"


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
    order = ([prefer] if prefer in names else []) + [n for n in names if n not in OPT_IN]
    for name in order:
        if KERNELS[name].usable(layer, device):
            return KERNELS[name]
    return DequantFloat


def describe(kernel_cls: type, layer, act_qmax: int | None) -> str:
    """Report name: kernel plus the precisions it computes in, e.g. "cpu-onednn-int8:w4a8-dynamic"."""
    if act_qmax is None:
        act = "a16" if layer.act_mode == "none" or kernel_cls is DequantFloat else "a8"
    else:
        act = f"a{act_bits_of(act_qmax)}"
    return f"{kernel_cls.name}:w{layer.weight_bits}{act}-{layer.act_mode}"
