"""score's per-layer components, computed from the profile alone (definitions: docs/sensitivity.md).

PCA sensitivity, k95/d, activation energy and range variability per layer, and how they are put on
one scale (z-score or rank percentile) and combined into one score with a CDF and rank over layers.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffpro_cli.stages.score import ScoreConfig

COMPONENTS = ("pca_sensitivity", "log10_energy", "k95_over_d", "range_variability")


def k_for_variance(eigvals: torch.Tensor, fraction: float = 0.95) -> int:
    """Smallest k whose top-k eigenvalues explain `fraction` of the total (0 for a zero spectrum)."""
    lam = eigvals.double().clamp_min(0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0:
        return 0
    cum = lam.cumsum(0) / total
    k = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=torch.float64) - 1e-12)) + 1
    return min(k, lam.numel())


def dimension_ratio(count: float, width: int, d: int) -> float:
    """count/d for a spectrum of full width d; for a CountSketch of width < d, an estimate of it.

    A sketch keeps the COUNT of a concentrated spectrum (count ≪ width) but the RATIO of a spread one;
    with r = count/width the estimate (1 - r)·count/d + r·r moves between the two (= count/d when width
    = d). Error on synthetic spectra, d = 4608 → 2048: ≤ 0.05 (docs/sensitivity.md).
    """
    if width <= 0 or d <= 0:
        return 0.0
    r = min(count / width, 1.0)
    return (1 - r) * count / d + r * r


def pca_sensitivity(eigvals: torch.Tensor, metric: str = "erank", d: int | None = None) -> float:
    """A scalar in [0, 1) from the spectrum: 0 = isotropic, → 1 = all variance along one direction.

    erank: 1 - exp(entropy of λ/Σλ)/d; participation: 1 - (Σλ)²/Σλ²/d; top1: λ1/Σλ. `d` is the true input
    width when `eigvals` come from a narrower sketch.
    """
    lam = eigvals.double().clamp_min(0)
    width = lam.numel()
    d = d or width
    total = float(lam.sum())
    if total <= 0 or width == 0:
        return 0.0
    p = lam / total
    if metric == "top1":
        return float(p.max())
    if metric == "participation":
        return 1.0 - dimension_ratio(float(1.0 / p.square().sum()), width, d)
    nz = p[p > 0]
    return 1.0 - dimension_ratio(math.exp(float(-(nz * nz.log()).sum())), width, d)


def explained_variance(eigvals: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio of a descending spectrum."""
    lam = eigvals.double().clamp_min(0)
    total = float(lam.sum())
    return lam.cumsum(0) / total if total > 0 else torch.zeros_like(lam)


def range_variability(ts_absmax: torch.Tensor, ts_rows: torch.Tensor) -> float:
    """Coefficient of variation of the per-timestep |x|max over the timesteps the layer ran at."""
    a = ts_absmax[ts_rows > 0].double()
    if a.numel() < 2 or float(a.mean()) <= 0:
        return 0.0
    return float(a.std(unbiased=False) / a.mean())


def layer_components(tensors: dict, name: str, d: int, cfg: ScoreConfig) -> dict:
    """The paper's four signals for one layer (d = its true input width)."""
    lam = tensors[f"{name}/pca_eigvals"]
    rows = tensors[f"{name}/ts_rows"].double()
    ratio = dimension_ratio(k_for_variance(lam, cfg.variance), lam.numel(), d)
    energy = float((tensors[f"{name}/ts_energy"] * rows).sum() / rows.sum().clamp_min(1))
    return {
        "k95": round(ratio * d),
        "k95_over_d": ratio,
        "pca_sensitivity": pca_sensitivity(lam, cfg.pca_metric, d),
        "log10_energy": math.log10(max(energy, 1e-30)),
        "range_variability": range_variability(tensors[f"{name}/ts_absmax"], tensors[f"{name}/ts_rows"]),
    }


def zscores(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    if sd <= 0 or not math.isfinite(sd):
        return [0.0] * len(values)
    return ((t - t.mean()) / sd).tolist()


def rank_scores(values: list[float]) -> list[float]:
    """Mid-rank percentiles in (0, 1): ties share their average rank."""
    from scipy.stats import rankdata

    n = len(values)
    return [(float(r) - 0.5) / n for r in rankdata(values)] if n else []


def combined_scores(comps: dict[str, dict], weights: dict, normalize: str = "zscore") -> dict[str, float]:
    """Σ_c w_c · norm_c over layers, norm = z-score (default) or rank percentile of the component."""
    names = list(comps)
    norm = zscores if normalize == "zscore" else rank_scores
    total = [0.0] * len(names)
    for c in COMPONENTS:
        w = weights.get(c, 0.0)
        if w:
            z = norm([comps[n][c] for n in names])
            total = [a + w * b for a, b in zip(total, z)]
    return dict(zip(names, total))


def cdf_and_rank(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """Empirical CDF (fraction of layers with score ≤ s) and rank (1 = highest; ties in layer order)."""
    values = sorted(scores.values())
    cdf = {k: bisect.bisect_right(values, v) / len(values) for k, v in scores.items()}
    order = sorted(scores, key=lambda k: -scores[k])
    return cdf, {k: i + 1 for i, k in enumerate(order)}
