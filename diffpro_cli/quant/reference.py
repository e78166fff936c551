"""Fake-quant reference (quantize → dequantize → float math).

Used ONLY by tests (to check the integer kernels) and by error estimation (score --measure,
allocation error models). Never used by `bench` for speed or size numbers.
"""

from __future__ import annotations

import torch


def weight_qparams(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Symmetric per-output-channel (or per-group along the input dim) scales for weight [out, in, ...].

    Returns (scale broadcastable to w reshaped as [out, groups, group], qmax).
    """
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).float()
    g = group_size or flat.shape[1]
    if flat.shape[1] % g:
        raise ValueError(f"group size {g} does not divide {flat.shape[1]}")
    grouped = flat.reshape(flat.shape[0], -1, g)
    scale = grouped.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return scale, qmax


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round a weight to a symmetric `bits`-bit grid (per output channel or per group) and back."""
    if bits >= 16:
        return w
    scale, qmax = weight_qparams(w, bits, group_size)
    flat = w.reshape(w.shape[0], -1).float().reshape(scale.shape[0], scale.shape[1], -1)
    q = torch.clamp(torch.round(flat / scale), -qmax - 1, qmax)
    return (q * scale).reshape(w.shape).to(w.dtype)


def fake_quant_act_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token (last dim) activation fake-quant."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
