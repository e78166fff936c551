"""Pair-bounded int8 weights: full 8-bit activations on CPUs without VNNI.

AVX2 CPUs (no VNNI) multiply u8 activations by s8 weights with `vpmaddubsw`, which adds the products of
two ADJACENT reduction positions into a saturating int16 before widening to int32. With 8-bit
activations (u8 codes up to 255) and 8-bit weights (|q| ≤ 127) one pair reaches 2·255·127 = 64770 >
32767 and the GEMM result is wrong. Bounding every pair instead of every weight, |q[2j]| + |q[2j+1]|
≤ 128, gives at most 255·128 = 32640: no saturation, whatever the activations.

Which positions are paired (measured with torch 2.14.1, fbgemm and oneDNN capped to AVX2 on a VNNI
CPU, activations all 255, two weights of 127):
  * Linear (fbgemm `quantized.linear_dynamic`, oneDNN `qlinear_pointwise`): (2j, 2j+1) along the input
    dimension K, for every K tried (37, 64, 1031; blocks at 256/512 included); an odd K's last
    position pairs with padding. Any other two positions were exact.
  * Conv2d (oneDNN `qconv2d_pointwise`, jit_uni_int8:avx2): input channels (2c, 2c+1) at the same
    kernel tap; positions at different taps are never paired, also for an odd channel count.
  (Uncapped, with VNNI, nothing saturates.)

A violating pair is moved onto the bound by the squared-error projection: both magnitudes shrink by
the same amount (the excess split in two), signs kept, then rounded so the pair sums to exactly 128.
Given the unrounded targets (w / scale) the pair is re-rounded jointly from them instead. With
per-channel scales few pairs violate (both members must be near the channel's maximum).
"""

from __future__ import annotations

import torch

PAIR_BOUND = 128   # 255 · 128 = 32640 ≤ 32767 (int16 max)


def pair_bound(q: torch.Tensor, target: torch.Tensor | None = None, bound: int = PAIR_BOUND) -> tuple[torch.Tensor, int]:
    """Integer weights [out, K] whose pairs (2j, 2j+1) along K satisfy |q[2j]| + |q[2j+1]| ≤ `bound`,
    and the number of weights that changed. Pairs within the bound are returned unchanged.

    `target` (optional, float [out, K]): the unrounded weights w / scale; violating pairs are then
    re-rounded from it (least squared error on the bound) instead of from `q`."""
    if q.dim() != 2:
        raise ValueError(f"pair_bound expects [out, K] integer weights, got shape {tuple(q.shape)}")
    out, k = q.shape
    t = (q if target is None else target).float()
    qi = q.to(torch.int32)
    if k % 2:   # the last position pairs with padding (zero)
        qi = torch.cat([qi, qi.new_zeros(out, 1)], dim=1)
        t = torch.cat([t, t.new_zeros(out, 1)], dim=1)
    qp, tp = qi.reshape(out, -1, 2), t.reshape(out, -1, 2)
    bad = qp.abs().sum(-1) > bound                       # [out, K/2]
    if not bool(bad.any()):
        return q.clone(), 0
    m = tp[bad].abs()                                    # [n, 2] target magnitudes
    excess = (m.sum(-1, keepdim=True) - bound).clamp_min(0)
    p = (m - excess / 2).clamp_min(0)                    # projection onto |a| + |b| = bound
    p = p * (bound / p.sum(-1, keepdim=True).clamp_min(bound))   # if one member hit 0 (far-off targets)
    base = p.floor()
    short = (bound - base.sum(-1)).clamp(0, 2).long()    # 0, 1 (or 2 for tiny pairs): give by fraction
    frac = p - base
    first = frac[:, 0] >= frac[:, 1]
    add = torch.zeros_like(base)
    add[:, 0] = (short >= 1) & first | (short >= 2)
    add[:, 1] = (short >= 1) & ~first | (short >= 2)
    mag = torch.minimum(base + add, m.round().clamp_max(127))   # never grow a magnitude
    new = (mag * torch.where(tp[bad] < 0, -1.0, 1.0)).to(torch.int32)
    qp = qp.clone()
    qp[bad] = new
    result = qp.reshape(out, -1)[:, :k].to(q.dtype)
    return result, int((result != q).sum())


def pair_bound_conv(q: torch.Tensor, target: torch.Tensor | None = None, bound: int = PAIR_BOUND) -> tuple[torch.Tensor, int]:
    """`pair_bound` for Conv2d integer weights [out, in, kh, kw] (groups = 1): oneDNN pairs input
    channels (2c, 2c+1) at each kernel tap, so the pairs run along `in` with the tap held fixed."""
    o, i, kh, kw = q.shape
    flat = q.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
    tflat = None if target is None else target.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
    fixed, changed = pair_bound(flat, tflat, bound)
    return fixed.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous(), changed
