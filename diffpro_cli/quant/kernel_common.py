"""What every kernel shares: the registry of kernel classes, activation scales, the stacked per-channel
int8 weights of layers fed one input, and explicit conv padding. kernels.py (CPU, the registry table and
the selection rule) and kernels_cuda.py build on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffpro_cli.quant.formats import fold_to_channel_grid

KERNELS: dict[str, type] = {}


def register(cls):
    KERNELS[cls.name] = cls
    return cls


# Every kernel class: `name`, `usable(layer, device)`, `__init__(layers, device)` (prepare),
# `__call__(layer, x)` (layer = the first of `layers`, for its activation mode and static scales) and
# `act_qmax` (the activation grid; None for float activations).


def row_scales(x2d: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-token symmetric scale [M, 1] (same arithmetic as reference.fake_quant_act_per_token)."""
    return x2d.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(qmax)


def tensor_scale(x: torch.Tensor, qmax: int) -> float:
    """One symmetric scale for the whole input (detached: an input that requires grad warned on every call)."""
    return max(float(x.detach().abs().amax()), 1e-12) / qmax


def sample_scales(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-sample symmetric scale [B, 1, 1, 1] for NCHW input."""
    return x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min_(1e-12).div_(qmax)


def nan_rows_of_nonfinite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` with NaN in every row (first dim: token of a Linear, sample of a Conv2d) whose input row in `x`
    holds a NaN or ±inf. For kernels whose quantization hides them: fbgemm turns a NaN into a valid
    integer, and a calibrated (static) scale clamps ±inf, so the row would come out finite and wrong.
    The fast test is one sum over x (any NaN/inf makes it non-finite; a finite sum that overflows only
    costs the exact per-row test)."""
    if x.numel() == 0 or math.isfinite(float(x.detach().sum())):
        return y
    bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        y[bad] = float("nan")
    return y


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
    """The explicit pad in the layer's padding mode (a "same" padding is reflected, replicated or wrapped
    too when the mode says so, as nn.Conv2d does)."""
    if extra is None:
        return x
    return F.pad(x, extra, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
