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
Given the unrounded targets (w / scale) the pair is re-rounded jointly from them instead.

On its own that is only good where few pairs violate: both members must lie above half the channel's
maximum, about 0.6 % of the weights of a Laplace-like layer, 3 % of a Gaussian one, but 22 % of the
built-in DiT's near-uniform weights (their squared error then grows 800x and PSNR falls to 15 dB).
`bounded_channel_grid` therefore also searches each channel's scale between x1 and x127/64 (where no
pair can exceed the bound: the global |q| ≤ 64 cap) for the least error after the bound; measured in
benchmarks/pair_bound_quality.py.

GPTQ rounding (`quantize --rounding gptq`, Linear layers) keeps the bound too (`bounded_gptq`): the
column loop clamps each odd column to |q| ≤ 128 − |q[partner]| as it rounds it and pushes that error onto
the columns not yet rounded like any other rounding error, so later columns compensate for the clamp;
it runs on each channel's 6 scale multipliers with the least bounded round-to-nearest weight error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffpro_cli.quant.formats import fp16_scale, gptq_inverse, quantize_weight

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


def bounded_channel_grid(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None = None,
                         conv_shape: Sequence[int] | None = None, steps: int = 16,
                         bound: int = PAIR_BOUND) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int8 [out, K], fp16-exact scale [out], changed): per-channel weights whose every kernel pair is
    within `bound`, with the least squared error per channel against `weight` (the float weights
    [out, K], when known: at quantize time) or else the stored q · scale. Each channel's scale is tried
    at `steps` multipliers from 1 (the stored grid, pair-bounded) to 127/64 (|q| ≤ 64: no pair exceeds
    128), so the result is never worse than either. `conv_shape` ([out, in, kh, kw]): pair along input
    channels as oneDNN's convolution does.
    Measured on the built-in DiT (W8A8, AVX2, 8-bit activations; benchmarks/pair_bound_quality.py):
    from the float weights +2.0 dB PSNR over 7-bit activations; from q · scale alone (double rounding)
    0.45 dB below them."""
    scale = scale.reshape(-1, 1).float()
    w = q.float() * scale if weight is None else weight.reshape(q.shape).float()
    best_q, best_s, _, _ = _channel_grid(w, scale, conv_shape, steps, bound)
    return best_q, best_s.reshape(-1), int((best_q != q).sum())


def _channel_grid(w: torch.Tensor, scale: torch.Tensor, conv_shape: Sequence[int] | None, steps: int,
                  bound: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bounded_channel_grid's search on float weights w [out, K] from scales [out, 1]: the best integers
    and scales [out, 1], and every multiplier's fp16-exact scales and squared weight errors [steps, out]."""
    best_err = best_q = best_s = None
    scales, errs = [], []
    for m in torch.linspace(1.0, 127 / (bound // 2), steps).tolist():
        s = fp16_scale(scale * m)
        t = w / s
        r = torch.round(t).clamp(-127, 127).to(torch.int8)
        if conv_shape is None:
            fixed, _ = pair_bound(r, t, bound)
        else:
            fixed, _ = pair_bound_conv(r.reshape(conv_shape), t.reshape(conv_shape), bound)
            fixed = fixed.reshape(w.shape)
        err = ((fixed.float() * s - w) ** 2).sum(1, keepdim=True)
        scales.append(s.reshape(-1))
        errs.append(err.reshape(-1))
        if best_err is None:
            best_err, best_q, best_s = err, fixed, s
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best_q, best_s = torch.where(take, fixed, best_q), torch.where(take, s, best_s)
    return best_q, best_s, torch.stack(scales), torch.stack(errs)


def bound_applies(weight_bits: int, group_size: int | None, float_activations: bool) -> bool:
    """The option side of the rule (bound_covers is the layer side): 8-bit per-channel weights on integer
    activations. layers.bound_pairs and the planner's view of a plan (pair_bound_assumption) both ask it."""
    return int(weight_bits) == 8 and group_size is None and not float_activations


def bound_covers(module) -> bool:
    """Whether quantize's pair bound can apply to this float layer at 8-bit per-channel weights on
    integer activations (layers.bound_pairs): Linear, or Conv2d without groups (oneDNN's pairing of
    grouped convolutions was not measured)."""
    from torch import nn

    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _bounded_gptq_columns(W: torch.Tensor, scale: torch.Tensor, Hinv: torch.Tensor, bound: int,
                          block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (formats.gptq_quantize, with its lazy block updates) on rows W (float64 [R, K],
    overwritten) with one scale a row (`scale` [R]): integers [R, K] in ±127 whose pairs (2j, 2j+1)
    are within `bound`, and each row's loss Σ err² [R], which equals e H' eᵀ for the damped hessian H'
    whose inverse's Cholesky factor `Hinv` is. An odd K's last column pairs with padding: only the ±127
    clamp."""
    rows, k = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, dtype=W.dtype)
    for b0 in range(0, k, block):   # `block` is even: a pair never straddles two blocks
        b1 = min(b0 + block, k)
        Wb, err = W[:, b0:b1].clone(), torch.empty(rows, b1 - b0, dtype=W.dtype)
        for j in range(b1 - b0):
            i = b0 + j
            lim = torch.full_like(scale, 127.0) if i % 2 == 0 else (bound - Q[:, i - 1].abs()).clamp_max(127)
            q = torch.maximum(torch.minimum(torch.round(Wb[:, j] / scale), lim), -lim)
            Q[:, i] = q
            err[:, j] = (Wb[:, j] - q * scale) / Hinv[i, i]
            Wb[:, j + 1:] -= err[:, j:j + 1] * Hinv[i, i + 1:b1].unsqueeze(0)
        loss += (err * err).sum(1)
        if b1 < k:
            W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return Q, loss


def bounded_gptq(weight: torch.Tensor, hessian: torch.Tensor, steps: int = 16, damp: float = 0.01,
                 bound: int = PAIR_BOUND, keep: int = 6) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int8 [out, K], fp16-exact scale [out], changed vs round-to-nearest): 8-bit per-channel GPTQ
    rounding (formats.gptq_quantize; `hessian` = E[x xᵀ] [K, K]) of Linear weights [out, K] whose every
    pair (2j, 2j+1) is within `bound`. Each channel's scale is searched over bounded_channel_grid's
    multipliers (x1 … x127/64) for the least output error e H eᵀ (e = w − ŵ): the `keep` multipliers
    with the least bounded round-to-nearest weight error (which bounded_channel_grid computes anyway)
    go through one batched column loop (GPTQ treats rows independently), whose own loss gives e H eᵀ
    without a [K, K] product per candidate. On random 1152 x 1152 and 1152 x 4608 layers (correlated
    inputs) keep=6 gives all 16's total e H eᵀ (within 0.001 %) in 0.8 s vs 2.8 s and 8.7 s vs 27 s;
    on the built-in DiT's 54 calibrated layers 0.9 % more in sum (worst layer 1.16x; keep=4: 2.2 %,
    1.39x), since GPTQ's best multiplier there lies ~2 steps below round-to-nearest's.
    Bounded round-to-nearest (bounded_channel_grid) is a candidate too, so no channel's output error
    exceeds what bound_pairs stores without a hessian.
    Measured on the built-in DiT (W8A8, AVX2 paths, benchmarks/pair_bound_quality.py): PSNR vs fp32
    43.22 dB (all 16 multipliers: 43.36 dB; keep=4 43.18, keep=8 43.04: noise of the end metric), vs
    40.36 dB for plain GPTQ on 7-bit activations and 41.70 dB for bounded round-to-nearest."""
    w = weight.detach().reshape(weight.shape[0], -1).float().cpu()
    out, k = w.shape
    q0, s0 = quantize_weight(w, 8)
    rq, rs, scales, werr = _channel_grid(w, s0.reshape(-1, 1).float(), None, steps, bound)
    Hinv = gptq_inverse(hessian, k, damp)
    if Hinv is None:
        return rq, rs.reshape(-1), int((rq != q0).sum())
    pick = werr.argsort(dim=0, stable=True)[:max(1, min(keep, steps))]               # [keep, out]
    cand_s = scales.gather(0, pick).double()
    wd = w.double()
    Q, loss = _bounded_gptq_columns(wd.repeat(pick.shape[0], 1), cand_s.reshape(-1), Hinv, bound)
    # the loop's loss is e H' eᵀ with gptq_inverse's H' = H (dead inputs on a unit diagonal) + λ I: undo both
    H = hessian.double().cpu()
    diag = torch.diagonal(H)
    dead = diag <= 0
    lam = damp * float(torch.where(dead, torch.ones_like(diag), diag).mean())
    e = Q.reshape(-1, out, k) * cand_s.unsqueeze(-1) - wd                          # [keep, out, K]
    gptq_err = loss.reshape(-1, out) - lam * (e * e).sum(-1) - (e[..., dead] ** 2).sum(-1)
    er = rq.double() * rs.double() - wd
    cand_err = torch.cat([gptq_err, ((er @ H) * er).sum(-1).unsqueeze(0)])          # [keep + 1, out]
    best = cand_err.argmin(0)
    rows = torch.arange(out)
    cand_q = torch.cat([Q.reshape(-1, out, k), rq.double().unsqueeze(0)])
    q = cand_q[best, rows].to(torch.int8)
    s = torch.cat([cand_s, rs.reshape(1, out).double()])[best, rows].float()
    return q, s, int((q != q0).sum())


def bounded_integers(weight: torch.Tensor, conv_shape: Sequence[int] | None = None,
                     hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What layers.bound_pairs stores for the float `weight`: (int8 [out, K], scale [out], changed).
    With `hessian` (Linear layers, quantize --rounding gptq) GPTQ rounding, else round-to-nearest."""
    w = weight.detach().cpu()
    if hessian is not None:
        return bounded_gptq(w, hessian)
    q, scale = quantize_weight(w, 8)
    return bounded_channel_grid(q, scale, w.reshape(q.shape), conv_shape=conv_shape)


def pair_bounded_weight(weight: torch.Tensor) -> torch.Tensor:
    """The float weights a pair-bounded 8-bit per-channel layer computes with: what layers.bound_pairs
    stores for `weight` ([out, in] or a Conv2d's [out, in, kh, kw]) without a hessian, dequantized.
    `score --measure` uses it so the measured 8-bit error is the one quantize's bounded layer really has
    (round-to-nearest; GPTQ only lowers it)."""
    from diffpro_cli.quant.formats import dequantize_weight

    w = weight.detach().cpu()
    q, scale, _ = bounded_integers(w, list(w.shape) if w.dim() == 4 else None)
    return dequantize_weight(q, scale.reshape(-1, 1)).reshape(w.shape).to(weight.dtype)
