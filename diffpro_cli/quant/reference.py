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


def fake_quant_act_static(x: torch.Tensor, absmax: float, bits: int = 8) -> torch.Tensor:
    """Static symmetric per-tensor activation fake-quant with a calibrated range (clamped)."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = max(float(absmax), 1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def fake_quant_act_per_sample(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-sample (all dims but the first) activation fake-quant, for convolutions."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    dims = tuple(range(1, x.ndim))
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def rounding_ambiguity(x: torch.Tensor, scale: torch.Tensor | float, qmax: int, delta: float = 2.0 ** -12) -> torch.Tensor:
    """Elements an integer kernel may legitimately round either way: x/scale within `delta` of a half
    step (kernels compute x/s with different float arithmetic and tie rules), or within `delta` of the
    clamp edge (one kernel family clamps asymmetrically to [-qmax-1, qmax])."""
    v = (x / scale).double()
    near_half = ((v - torch.floor(v)) - 0.5).abs() < delta
    near_edge = v.abs() > qmax + 0.5 - delta
    return near_half | near_edge


def kernel_tolerance(x: torch.Tensor, scale: torch.Tensor | float, qmax: int, w_ref: torch.Tensor,
                     bias: torch.Tensor | None = None, w_grid_step: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise bound on |integer kernel − fake-quant reference| for a Linear, from the data.

    x [M, K] float input, scale [M, 1] (or a float) the activation scale, w_ref [N, K] the reference
    (fake-quant) weight. The bound has three parts:
      1. float arithmetic: integer accumulation is exact, the dequantizing multiplies and the bias add
         round in float32 and the int32→float conversion keeps 24 bits: 16 float32 ulps of Σ|x̂||ŵ| + |b|;
      2. rounding ambiguity: each ambiguous element (see `rounding_ambiguity`) may land one step away,
         costing at most scale·|ŵ[o, k]|;
      3. weight grid: when group-wise weights are folded onto a per-channel int8 grid (step s8[o]),
         each weight moves by at most s8/2, costing |x̂_k|·s8[o]/2.
    """
    xd = x.double()
    scale_d = torch.as_tensor(scale, dtype=torch.float64)
    x_hat = torch.clamp(torch.round(xd / scale_d), -qmax, qmax) * scale_d
    wa = w_ref.double().abs()
    tol = 16 * 2.0 ** -24 * (x_hat.abs() @ wa.T)
    if bias is not None:
        tol = tol + 16 * 2.0 ** -24 * bias.double().abs()
    amb = rounding_ambiguity(x, scale, qmax).double()
    tol = tol + scale_d.expand(x.shape[0], 1) * (amb @ wa.T)
    if w_grid_step is not None:
        tol = tol + (xd.abs() + scale_d).sum(dim=-1, keepdim=True) * (w_grid_step.double().reshape(1, -1) / 2)
    return tol
