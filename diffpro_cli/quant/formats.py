"""Storage formats for integer weights: symmetric quantization, n-bit packing, group folding.

A quantized weight is stored as
  * `qweight`: the signed integers q in [-(2^(b-1)-1), 2^(b-1)-1], row-major over [out, in·kh·kw];
    8-bit as int8 (no packing), fewer bits packed into uint8 bytes (`pack_bits`);
  * `weight_scale`: [out, groups] (groups = 1: per output channel), w ≈ q · scale; every scale in fp16's
    normal range is an fp16 value (`fp16_scale`), so the checkpoint stores them as fp16 losslessly (half
    the bytes of fp32: 0.25 bit a weight on a 128-wide layer) while layers hold and compute with them in
    float32; a layer with scales outside it (tiny or huge weights) keeps and stores them in float32.

Packing uses offset binary (u = q + 2^(b-1)) and groups of values that fill whole bytes: 4-bit packs
two values per byte (low nibble first), 2-bit four per byte, 3-bit eight values into three bytes,
6-bit four values into three bytes. The same code handles every width from 1 to 8.
"""

from __future__ import annotations

import math

import torch

STORAGE_BITS = (2, 3, 4, 6, 8)


FP16_TINY, FP16_NORMAL_MIN, FP16_MAX = 2.0 ** -24, 2.0 ** -14, 65504.0


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to the nearest fp16 value (float32 out) where fp16 holds them to full precision (its
    normal range); smaller or larger ones stay float32 (the checkpoint then stores that tensor in
    float32: checkpoint._half_if_exact). fp16's subnormals round a scale by up to 2^-25 absolute, so a
    layer with small weights (max |w| below ~1e-3 at 8 bits) got a scale rounded down by more than half a
    step, saturating its largest weights, and below 2^-24 everything rounded to 0; above 65504 the
    scale was clamped. A zero scale (an all-zero row or group) becomes 2^-24: any nonzero one gives q = 0.
    Quantizing with the rounded scale (not rounding it afterwards) keeps q · scale exact after a reload."""
    half = scale.clamp(FP16_TINY, FP16_MAX).half().float()
    keep_float = ((scale > 0) & (scale < FP16_NORMAL_MIN)) | (scale > FP16_MAX)
    return torch.where(keep_float, scale.float(), half)


def fp16_exact(t: torch.Tensor) -> bool:
    """True for float32 values that fp16 holds exactly (scales made by `fp16_scale`): stored as fp16."""
    return t.dtype == torch.float32 and torch.equal(t.half().float(), t)


def qmax_for(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def layout_name(bits: int) -> str:
    """How `qweight` is laid out on disk, as recorded in diffpro.json."""
    return "int8" if bits == 8 else f"packed-int{bits}"


def _group_shape(bits: int) -> tuple[int, int]:
    """(values per group, bytes per group): the smallest run of values that fills whole bytes."""
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed to store `numel` values of `bits` bits."""
    if bits == 8:
        return numel
    values, nbytes = _group_shape(bits)
    return -(-numel // values) * nbytes


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers (any shape, values within the `bits` range) → flat uint8 bytes (int8 for 8 bits)."""
    if bits == 8:
        return q.to(torch.int8).reshape(-1).clone()
    if not 1 <= bits < 8:
        raise ValueError(f"cannot pack {bits}-bit values")
    values, nbytes = _group_shape(bits)
    u = (q.reshape(-1).to(torch.int64) + (1 << (bits - 1)))
    pad = (-u.numel()) % values
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.reshape(-1, values)
    shifts = torch.arange(values, dtype=torch.int64) * bits
    word = (u << shifts).sum(dim=1, keepdim=True)                      # ≤ 56 bits, fits int64
    out = (word >> (torch.arange(nbytes, dtype=torch.int64) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int, chunk_groups: int = 1 << 16) -> torch.Tensor:
    """Inverse of `pack_bits`: flat int8 tensor of the first `numel` values.

    Works through the bytes in chunks, so its int64 temporaries stay a few MB whatever the layer size
    (one pass over a 3.5M-weight layer would allocate ~100 MB of them, which the heap keeps)."""
    if bits == 8:
        return packed.reshape(-1)[:numel].to(torch.int8)
    values, nbytes = _group_shape(bits)
    groups = packed.reshape(-1, nbytes)
    out = torch.empty(groups.shape[0] * values, dtype=torch.int8)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64) * 8
    value_shifts = torch.arange(values, dtype=torch.int64) * bits
    mask, offset = (1 << bits) - 1, 1 << (bits - 1)
    for start in range(0, groups.shape[0], chunk_groups):
        b = groups[start:start + chunk_groups].to(torch.int64)
        word = (b << byte_shifts).sum(dim=1, keepdim=True)
        u = (word >> value_shifts) & mask
        out[start * values:(start + b.shape[0]) * values] = (u.reshape(-1) - offset).to(torch.int8)
    return out[:numel]


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: (q int8 [out, in_flat], scale float32 [out, groups]).

    Same arithmetic as `reference.fake_quant_weight`, so q · scale equals the reference weight exactly.
    """
    qmax = qmax_for(bits)
    flat = w.detach().reshape(w.shape[0], -1).float()
    g = group_size or flat.shape[1]
    if flat.shape[1] % g:
        raise ValueError(f"group size {g} does not divide the input size {flat.shape[1]}")
    grouped = flat.reshape(flat.shape[0], -1, g)
    scale = fp16_scale(grouped.abs().amax(dim=-1, keepdim=True) / qmax)
    q = torch.clamp(torch.round(grouped / scale), -qmax - 1, qmax)
    return q.reshape(flat.shape).to(torch.int8), scale.reshape(flat.shape[0], -1)


def gptq_inverse(hessian: torch.Tensor, cols: int, damp: float = 0.01) -> torch.Tensor | None:
    """GPTQ's upper Cholesky factor of the inverse of the damped `hessian` (float64 [cols, cols]; inputs
    that never fire get a unit diagonal); None where it is not positive definite even so."""
    H = hessian.double().clone()
    if H.shape != (cols, cols):
        raise ValueError(f"hessian is {tuple(H.shape)}, expected {(cols, cols)}")
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=H.dtype)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        return None


def gptq_quantize(w: torch.Tensor, bits: int, hessian: torch.Tensor, group_size: int | None = None,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-aware rounding (GPTQ, Frantar et al. 2022) on the same grid as `quantize_weight`.

    The scales are round-to-nearest's (absmax per channel or group), so the stored format and kernels
    are unchanged; only the choice of integers differs. Columns are rounded one at a time and each
    one's rounding error is pushed onto the columns not yet rounded, weighted by the inverse of
    `hessian` = E[x xᵀ] over calibration inputs, which minimises ‖(W - Ŵ) x‖² instead of ‖W - Ŵ‖².
    """
    qmax = qmax_for(bits)
    _, scale = quantize_weight(w, bits, group_size)
    W = w.detach().reshape(w.shape[0], -1).double().clone()
    cols = W.shape[1]
    g = group_size or cols
    col_scale = scale.double().repeat_interleave(g, dim=1)               # [out, in]
    Hinv = gptq_inverse(hessian, cols, damp)
    if Hinv is None:
        return quantize_weight(w, bits, group_size)
    Q = torch.empty_like(W)
    # GPTQ's lazy batch updates: inside a block of `block` columns the error goes to that block only; the
    # columns after it get the block's errors in one matrix product (the same arithmetic, reordered: one
    # pass over W per block instead of per column, 5x faster at K = 4608)
    block = 128
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        Wb, err = W[:, b0:b1], torch.empty(W.shape[0], b1 - b0, dtype=W.dtype)
        for j in range(b1 - b0):
            i = b0 + j
            q = torch.clamp(torch.round(Wb[:, j] / col_scale[:, i]), -qmax - 1, qmax)
            Q[:, i] = q
            err[:, j] = (Wb[:, j] - q * col_scale[:, i]) / Hinv[i, i]
            Wb[:, j + 1:] -= err[:, j:j + 1] * Hinv[i, i + 1:b1].unsqueeze(0)
        if b1 < cols:
            W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return Q.to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [out, in_flat], scale [out, groups] → float32 [out, in_flat]."""
    groups = scale.shape[1]
    return (q.float().reshape(q.shape[0], groups, -1) * scale.float().unsqueeze(-1)).reshape(q.shape)


def fold_to_channel_grid(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 [-127, 127] weights from any (q, scale).

    Per-output-channel weights are returned unchanged (they already lie on an int8 grid). Group-wise
    weights are dequantized and re-rounded onto one int8 grid per channel, because an int8 GEMM can
    only apply one scale per output column; this adds at most half an int8 step per weight.
    """
    if scale.shape[1] == 1:
        return q.to(torch.int8), scale.reshape(-1).float().contiguous()
    w = dequantize_weight(q, scale)
    q8, s8 = quantize_weight(w, 8)
    return q8, s8.reshape(-1).contiguous()
