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
    """One symmetric scale for the whole input (detached: an input that requires grad warned on every call;
    an empty input, which amax refuses, gets the floor)."""
    return max(float(x.detach().abs().amax()) if x.numel() else 0.0, 1e-12) / qmax


def sample_scales(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-sample symmetric scale [B, 1, 1, 1] for NCHW input."""
    return x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min_(1e-12).div_(qmax)


def split_nonfinite_rows(x: torch.Tensor, known: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x with every row holding a NaN or ±inf zeroed, the mask of those rows), or (x, None) where every
    value is finite; a row is a Linear's token or a Conv2d's sample (the first dim). For the kernels
    whose quantization would hide a non-finite value or trip on it: fbgemm quantizes a NaN to a valid
    integer (and raises "min should be less than or equal to max" where a NaN is the first element), a
    calibrated (static) scale clamps ±inf, and one per-tensor scale would let one bad token spoil every
    row. The kernel computes the zeroed input and `mark_rows` sets those rows to NaN. The fast test is
    one sum over x, skipped where the caller `known` x is not finite (any NaN/inf makes the sum
    non-finite; a finite sum that overflows only costs the exact per-row test). Never writes into x."""
    if x.numel() == 0 or (not known and math.isfinite(float(x.detach().sum()))):
        return x, None   # (detach, as tensor_scale: float() of a grad tensor warns)
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return x, None
    return x.masked_fill(bad.reshape(-1, *([1] * (x.dim() - 1))), 0.0), bad


def mark_rows(y: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """NaN in the rows of `y` whose input held a NaN or ±inf (split_nonfinite_rows)."""
    if bad is not None:
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
