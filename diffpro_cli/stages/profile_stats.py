"""What profile measures of one layer input, as plain functions of tensors: the GEMM input matrix, the
signed binary-log |x| histogram and its percentiles, and LayerStats, the streaming per-timestep,
per-channel and second-moment (PCA) accumulator (see profile.py for what is kept and why).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

# |x| histogram on a binary-log grid read straight from the float32 bits: 2**HIST_MANT_BITS bins per
# octave (relative bin width ≤ 12.5%) over [2**HIST_EXP_LO, 2**HIST_EXP_HI) ≈ [9.5e-7, 1.05e6).
HIST_MANT_BITS, HIST_EXP_LO, HIST_EXP_HI = 3, -20, 20
HIST_K = (HIST_EXP_HI - HIST_EXP_LO) << HIST_MANT_BITS   # magnitude bins per sign
HIST_BINS = 2 * HIST_K + 1                               # [-big .. -small] [|x| < 2**-20] [small .. big]
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)            # of |x|, per timestep
_RAW_SHIFT = 23 - HIST_MANT_BITS                         # float32: 23 mantissa bits
_RAW_CODES = 1 << (32 - _RAW_SHIFT)                      # sign | exponent | top mantissa bits


# ---------------------------------------------------------------------------------------------
# Inputs as GEMM matrices, histograms, percentiles
# ---------------------------------------------------------------------------------------------


def layer_input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the [rows, d] float32 matrix its GEMM multiplies."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x.float(), module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


def input_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def output_dim(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _fold_table() -> torch.Tensor:
    """Histogram bin of each raw float32 code (sign, exponent, top mantissa bits)."""
    code = torch.arange(_RAW_CODES)
    negative = code >= _RAW_CODES // 2
    j = (code % (_RAW_CODES // 2)) - ((127 + HIST_EXP_LO) << HIST_MANT_BITS)
    tiny = j < 0
    j = j.clamp(0, HIST_K - 1)
    return torch.where(tiny, HIST_K, torch.where(negative, HIST_K - 1 - j, HIST_K + 1 + j))


_FOLD = _fold_table()


def signed_log_hist(x: torch.Tensor) -> torch.Tensor:
    """Counts of x in HIST_BINS signed binary-log bins (int64). Three passes over x, no log()."""
    bits = x.float().contiguous().reshape(-1).view(torch.int32)
    raw = torch.bincount((bits >> _RAW_SHIFT) & (_RAW_CODES - 1), minlength=_RAW_CODES)
    return torch.zeros(HIST_BINS, dtype=torch.int64).index_add_(0, _FOLD, raw)


def hist_magnitude_edges() -> torch.Tensor:
    """Edges [0, 2**-20, ..., 2**20] of the |x| histogram returned by `magnitude_hist`."""
    j = torch.arange(HIST_K + 1, dtype=torch.float64)
    per = 1 << HIST_MANT_BITS
    edges = 2.0 ** (HIST_EXP_LO + torch.div(j, per, rounding_mode="floor")) * (1 + (j % per) / per)
    return torch.cat([torch.zeros(1, dtype=torch.float64), edges])


def magnitude_hist(hist: torch.Tensor) -> torch.Tensor:
    """Signed histogram [..., HIST_BINS] → |x| histogram [..., HIST_K + 1] (bin 0 = |x| < 2**-20)."""
    zero = hist[..., HIST_K:HIST_K + 1]
    return torch.cat([zero, hist[..., HIST_K + 1:] + hist[..., :HIST_K].flip(-1)], dim=-1)


def abs_percentiles(hist: torch.Tensor, qs=PERCENTILES, absmax: float | None = None) -> list[float]:
    """Percentiles of |x| from one signed histogram, interpolated linearly inside a bin, capped at |x|max."""
    mag = magnitude_hist(hist).double()
    edges = hist_magnitude_edges()
    cum = mag.cumsum(0)
    total = float(cum[-1])
    out = []
    for q in qs:
        if total <= 0:
            out.append(0.0)
            continue
        target = q / 100.0 * total
        j = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64))), len(mag) - 1)
        below = float(cum[j] - mag[j])
        frac = min(max((target - below) / max(float(mag[j]), 1.0), 0.0), 1.0)
        value = float(edges[j]) + frac * float(edges[j + 1] - edges[j])
        out.append(min(value, absmax) if absmax is not None else value)
    return out


def layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


# ---------------------------------------------------------------------------------------------
# Streaming statistics of one layer input
# ---------------------------------------------------------------------------------------------


class LayerStats:
    """Streaming statistics of one layer input (see module docstring). Memory: O(T·bins + width²)."""

    def __init__(self, d: int, n_timesteps: int, max_dim: int = 2048, max_rows: int = 1024, seed: int = 0):
        T = n_timesteps
        self.d = d
        self.rows = torch.zeros(T, dtype=torch.int64)
        self.sum = torch.zeros(T, dtype=torch.float64)
        self.sumsq = torch.zeros(T, dtype=torch.float64)
        self.min = torch.full((T,), math.inf)
        self.max = torch.full((T,), -math.inf)
        self.hist = torch.zeros(T, HIST_BINS, dtype=torch.int64)
        self.ch_sum = torch.zeros(d, dtype=torch.float64)
        self.ch_sumsq = torch.zeros(d, dtype=torch.float64)
        self.ch_absmax = torch.zeros(d)
        self.width = min(d, max_dim)
        self.gram = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.gram_sum = torch.zeros(self.width, dtype=torch.float64)
        self.gram_rows = 0
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.bucket = self.sign = None
        if self.width < d:  # CountSketch: channel j → bucket[j] with sign[j]; balanced buckets
            g = torch.Generator().manual_seed(seed + 1)
            self.bucket = torch.randperm(d, generator=g) % self.width
            self.sign = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1

    @property
    def sketched(self) -> bool:
        return self.bucket is not None

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        if self.bucket is None:
            return x
        return torch.zeros(x.shape[0], self.width).index_add_(1, self.bucket, x * self.sign)

    def add(self, ti: int, x: torch.Tensor, elements: torch.Tensor | None = None) -> None:
        """Add GEMM rows x [n, d] observed at timestep index ti.

        `elements` (default x) feeds the histogram: for a conv, its input tensor, whose values the
        patch matrix repeats up to kh·kw times (zero padding is not counted there).
        """
        x = x.float()
        cmin, cmax = x.amin(0), x.amax(0)          # NaN propagates through amin/amax
        if not (torch.isfinite(cmin).all() and torch.isfinite(cmax).all()):
            raise ValueError("non-finite activations")
        s, sq = x.sum(0), (x * x).sum(0)
        self.rows[ti] += x.shape[0]
        self.sum[ti] += float(s.sum())
        self.sumsq[ti] += float(sq.sum())
        self.min[ti] = min(float(self.min[ti]), float(cmin.min()))
        self.max[ti] = max(float(self.max[ti]), float(cmax.max()))
        self.hist[ti] += signed_log_hist(x if elements is None else elements)
        self.ch_sum += s
        self.ch_sumsq += sq
        torch.maximum(self.ch_absmax, torch.maximum(cmax, -cmin), out=self.ch_absmax)
        if x.shape[0] > self.max_rows:
            x = x[torch.randperm(x.shape[0], generator=self.gen)[: self.max_rows]]
        z = self.sketch(x)
        self.gram.add_(z.T @ z)                    # float32 GEMM, float64 accumulator
        self.gram_sum += z.sum(0)
        self.gram_rows += z.shape[0]

    def covariance(self) -> torch.Tensor:
        """Covariance (float64, [width, width]) of the (sketched) input over all timesteps."""
        n = max(self.gram_rows, 1)
        mean = self.gram_sum / n
        return self.gram / n - torch.outer(mean, mean)

    def spectrum(self) -> torch.Tensor:
        """PCA eigenvalues of the covariance, descending, clipped at 0 (float64)."""
        cov = self.covariance()
        cov = (cov + cov.T) / 2
        return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)

    def timestep_tensors(self) -> dict[str, torch.Tensor]:
        rows = self.rows.clamp_min(1).double()
        absmax = torch.maximum(self.min.abs(), self.max.abs())
        pct = [abs_percentiles(self.hist[i], absmax=float(absmax[i])) for i in range(len(self.rows))]
        nonempty = self.rows > 0
        zero = torch.zeros_like(self.min)
        return {
            "ts_rows": self.rows.clone(),
            "ts_mean": (self.sum / rows / self.d).float(),
            "ts_energy": self.sumsq / rows,                 # mean over rows of Σ_j x_j²
            "ts_min": torch.where(nonempty, self.min, zero),
            "ts_max": torch.where(nonempty, self.max, zero),
            "ts_absmax": torch.where(nonempty, absmax, zero),
            "ts_hist": self.hist.clone(),
            "ts_percentiles": torch.tensor(pct, dtype=torch.float32).reshape(len(self.rows), len(PERCENTILES)),
        }

    def channel_tensors(self) -> dict[str, torch.Tensor]:
        n = max(int(self.rows.sum()), 1)
        return {"ch_mean": (self.ch_sum / n).float(), "ch_meansq": (self.ch_sumsq / n).float(),
                "ch_absmax": self.ch_absmax.clone()}
