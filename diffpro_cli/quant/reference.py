"""Fake-quant reference (quantize → dequantize → float math).

Used ONLY by tests (to check the integer kernels) and by error estimation (score --measure,
allocation error models). Never used by `bench` for speed or size numbers.
"""

from __future__ import annotations

import torch

from diffpro_cli.quant.formats import fp16_scale


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
    scale = fp16_scale(grouped.abs().amax(dim=-1, keepdim=True) / qmax)
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


def asym_tensor_qparams(x: torch.Tensor, reduce_range: bool = False) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of a per-tensor asymmetric u8 range that includes 0, chosen the
    way fbgemm's ChooseQuantizationParams does (torch.ops.quantized.linear_dynamic uses it)."""
    qmin, qmax = 0, (127 if reduce_range else 255)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if float(torch.tensor(scale, dtype=torch.float32)) == 0.0:
        scale = 0.1
    from_min, from_max = qmin - lo / scale, qmax - hi / scale
    err_min, err_max = abs(qmin) - abs(lo / scale), abs(qmax) - abs(hi / scale)
    zp = from_min if err_min < err_max else from_max
    zp = int(min(max(round(zp), qmin), qmax))
    return float(torch.tensor(scale, dtype=torch.float32)), zp, qmin, qmax


def reference_activation(x: torch.Tensor, scheme: str, qmax: int | None, static_absmax: float | None = None,
                         reduce_range: bool = False, delta: float = 2.0 ** -12):
    """Fake-quant activations as a kernel's `act_scheme` defines them, for a [M, K] input (or [B, ...]
    for "sample"). Returns (x_hat, step, ambiguous): the float64 dequantized input, the quantization
    step broadcastable to x's rows, and the elements a kernel may round either way — x/step within
    `delta` of a half step or of the clamp edge (kernels divide in different float arithmetic, use
    other tie rules, and one family clamps to [-qmax-1, qmax])."""
    xd = x.double()
    if scheme == "float":
        return xd, torch.zeros(1, dtype=torch.float64), torch.zeros_like(xd, dtype=torch.bool)
    if scheme == "tensor-asym":
        scale, zp, lo, hi = asym_tensor_qparams(x, reduce_range)
        step = torch.tensor(scale, dtype=torch.float64)
        v = xd / step + zp
        q = torch.clamp(torch.round(v), lo, hi)
        edge = (v < lo - 0.5 + delta) | (v > hi + 0.5 - delta)
        near_half = ((v - torch.floor(v)) - 0.5).abs() < delta
        return (q - zp) * step, step, near_half | edge
    if scheme == "token":
        step = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12).double() / qmax
    elif scheme == "sample":
        dims = tuple(range(1, x.ndim))
        step = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12).double() / qmax
    elif scheme == "tensor":
        step = x.abs().amax().clamp_min(1e-12).double() / qmax
    elif scheme == "static":
        step = torch.tensor(max(float(static_absmax), 1e-12) / qmax, dtype=torch.float64)
    else:
        raise ValueError(f"unknown activation scheme {scheme!r}")
    v = xd / step
    near_half = ((v - torch.floor(v)) - 0.5).abs() < delta
    edge = v.abs() > qmax + 0.5 - delta
    return torch.clamp(torch.round(v), -qmax, qmax) * step, step, near_half | edge


def kernel_tolerance(x_hat: torch.Tensor, step: torch.Tensor, ambiguous: torch.Tensor, w_ref: torch.Tensor,
                     bias: torch.Tensor | None = None, w_grid_step: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise bound on |integer kernel − fake-quant reference| for y = x̂ ŵᵀ + b, from the data.

    x_hat [M, K], step [M, 1] or scalar, ambiguous [M, K] (see `reference_activation`), w_ref [N, K]
    the reference weight. Three parts:
      1. float arithmetic: the integer accumulation is exact; int32→float keeps 24 bits and the
         dequantizing multiplies and the bias add round in float32: 16 float32 ulps of Σ|x̂||ŵ| + |b|;
      2. rounding ambiguity: an ambiguous element may land one step away: step·|ŵ[o, k]| each;
      3. weight grid: group-wise weights folded onto a per-channel int8 grid (step s8[o]) move by at
         most s8/2 each: (Σ_k |x̂_k| + step/2)·s8[o]/2.
    """
    wa = w_ref.double().abs()
    xa = x_hat.double().abs()
    tol = 16 * 2.0 ** -24 * (xa @ wa.T)
    if bias is not None:
        tol = tol + 16 * 2.0 ** -24 * bias.double().abs()
    step = torch.as_tensor(step, dtype=torch.float64)
    tol = tol + step.reshape(-1, 1) * (ambiguous.double() @ wa.T) if step.numel() > 1 else tol + step * (ambiguous.double() @ wa.T)
    if w_grid_step is not None:
        k = x_hat.shape[-1]
        tol = tol + (xa.sum(dim=-1, keepdim=True) + k * step.reshape(-1, 1) / 2) * (w_grid_step.double().reshape(1, -1) / 2)
    return tol


def conv_kernel_tolerance(conv, x_hat: torch.Tensor, step: torch.Tensor, ambiguous: torch.Tensor, w_ref: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """`kernel_tolerance` for a convolution: the same three parts, with the sums over each output
    position's receptive field taken by convolving |x̂| and the ambiguity mask with |ŵ|.
    `conv(x, w)` is the layer's float convolution without bias (its geometry)."""
    wa = w_ref.double().abs()
    tol = 16 * 2.0 ** -24 * conv(x_hat.double().abs(), wa)
    if bias is not None:
        tol = tol + 16 * 2.0 ** -24 * bias.double().abs().view(1, -1, 1, 1)
    return tol + torch.as_tensor(step, dtype=torch.float64) * conv(ambiguous.double(), wa)
