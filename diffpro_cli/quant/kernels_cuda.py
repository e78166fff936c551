"""CUDA kernels: int8 tensor cores through torch._int_mm (Linear, and Conv2d as im2col), tinygemm int4
weight-only and FP8 `_scaled_mm`. They register themselves in kernel_common.KERNELS on import
(kernels.py imports this module); the registry table in kernels.py says when each is a candidate.
Each is plain torch ops (`traceable`): under torch.compile a prepared layer is traced into the graph
(compiled_cuda.py), where the CPU's opaque oneDNN/fbgemm calls are graph breaks.

UNVERIFIED: these kernels follow the documented contracts of those ops but have NOT run on a GPU in this
project (see docs/quantization.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpro_cli.quant.formats import dequantize_weight
from diffpro_cli.quant.kernel_common import (
    _explicit_padding,
    _pad,
    _stacked_weights,
    register,
    sample_scales,
)


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
    traceable = True      # plain torch ops: torch.compile traces them (layers._traced_forward)

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
    traceable = True

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
    traceable = True
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
    traceable = True
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
