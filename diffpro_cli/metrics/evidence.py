"""The uncertainty and closeness columns of a bench report, from each row's Inception features (computed
once) and its first paired images: FID and FID vs the baseline with bootstrap intervals, KID, PSNR and
SSIM vs the baseline row with intervals, and paired intervals of differences between rows.

Every row is resampled with the SAME bootstrap indices (rows share seeds and labels, so sample j of one
row pairs with sample j of another); any difference between two rows is then paired: its replicates
are the differences of the rows' replicates (see `Replicates.paired_ci`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffpro_cli.metrics import paired as P
from diffpro_cli.metrics import stats as S


@dataclass
class Replicates:
    """Bootstrap replicates per row and metric ("fid", "fid_vs_fp") with the point estimates; not
    written to the report (only the intervals derived from them are)."""
    indices: dict[int, np.ndarray] = field(default_factory=dict)    # n → [B, n]
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)

    def paired_ci(self, a: str, b: str, metric: str = "fid") -> list[float] | None:
        """95 % interval of metric(a) - metric(b) on the same resamples; None where either is missing."""
        va, vb = self.values.get(a, {}).get(metric), self.values.get(b, {}).get(metric)
        if va is None or vb is None or self.n.get(a) != self.n.get(b):
            return None
        return S.paired_interval(va, vb, self.estimates[a][metric], self.estimates[b][metric],
                                 indices=self.indices[self.n[a]])


def settings(seed: int, resamples: int = S.BOOTSTRAP_RESAMPLES, kid_reference: dict | None = None) -> dict:
    """What the report records about these metrics (every random choice and its seed)."""
    return {
        "bootstrap": {"resamples": resamples, "seed": seed, "level": S.CI_LEVEL, "min_n": S.MIN_INTERVAL_N,
                      "method": "percentile interval re-centred on the estimate after regressing out the "
                                "resamples' duplicate counts; same indices for every row (paired)"},
        "kid": {"subsets": S.KID_SUBSETS, "subset_size_max": S.KID_SUBSET_SIZE, "seed": seed,
                "kernel": "(x.y/d + 1)^3", "reference": kid_reference},
        "paired": {"n_max": P.PAIRED_N, "images": "uint8/255 in [0, 1]", "bootstrap_seed": seed,
                   "ssim": f"gaussian window {P.SSIM_WINDOW}, sigma {P.SSIM_SIGMA}, K1 {P.SSIM_K1}, K2 {P.SSIM_K2}, valid",
                   "psnr_floor": "MSE floored at one pixel one uint8 level off"},
    }


def measure_rows(features: dict, paired_images: dict, mu_ref, sigma_ref, ref_features=None, *,
                 seed: int = 0, baseline: str = "fp32", resamples: int = S.BOOTSTRAP_RESAMPLES) -> tuple[dict, Replicates]:
    """Per row: fid, fid_ci95, n, fid_vs_fp, fid_vs_fp_ci95, kid, kid_std, psnr_vs_fp32(_ci95),
    ssim_vs_fp32(_ci95) (null where not measurable), and the replicates for paired differences.
    Below S.MIN_INTERVAL_N samples every interval is null and no replicates are kept."""
    reps = Replicates()
    out: dict[str, dict] = {}
    base = features.get(baseline)
    for name, feats in features.items():
        n = len(feats)
        boot_ok = n >= S.MIN_INTERVAL_N
        if boot_ok and n not in reps.indices:
            reps.indices[n] = S.bootstrap_indices(n, resamples, seed)
        idx = reps.indices.get(n)
        ident = np.arange(n)[None]
        fid = float(S.fid_replicates(feats, mu_ref, sigma_ref, ident)[0])
        row = {"fid": fid, "fid_ci95": None, "n": n,
               "fid_vs_fp": None, "fid_vs_fp_ci95": None, "kid": None, "kid_std": None}
        if boot_ok:
            boot = S.fid_replicates(feats, mu_ref, sigma_ref, idx)
            reps.values[name], reps.estimates[name], reps.n[name] = {"fid": boot}, {"fid": fid}, n
            row["fid_ci95"] = S.interval(boot, fid, indices=idx)
        if base is not None and len(base) == n:
            if name == baseline:
                row["fid_vs_fp"] = 0.0   # by definition; its interval stays null
            else:
                vs = float(S.fid_replicates_between(feats, base, ident)[0])
                row["fid_vs_fp"] = vs
                if boot_ok:
                    vboot = S.fid_replicates_between(feats, base, idx)
                    row["fid_vs_fp_ci95"] = S.interval(vboot, vs, indices=idx)
                    reps.values[name]["fid_vs_fp"], reps.estimates[name]["fid_vs_fp"] = vboot, vs
        if ref_features is not None:
            k = S.kid(feats, ref_features, seed=seed)
            row["kid"], row["kid_std"] = k["kid"], k["kid_std"]
        row.update(paired_metrics(paired_images.get(name), paired_images.get(baseline), name == baseline, seed, resamples))
        out[name] = row
    if baseline in reps.values and baseline in features:
        z = np.zeros(resamples)
        reps.values[baseline]["fid_vs_fp"], reps.estimates[baseline]["fid_vs_fp"] = z, 0.0
    return out, reps


def paired_metrics(images, base_images, is_baseline: bool, seed: int, resamples: int) -> dict:
    """psnr_vs_fp32 / ssim_vs_fp32 (+ _ci95) of a row's paired images against the baseline's."""
    out = {"psnr_vs_fp32": None, "psnr_vs_fp32_ci95": None, "ssim_vs_fp32": None, "ssim_vs_fp32_ci95": None,
           "paired_n": None}
    if images is None or base_images is None or is_baseline:
        return out
    n = min(len(images), len(base_images))
    if n < 2:
        return out
    a, b = images[:n], base_images[:n]
    idx = S.bootstrap_indices(n, resamples, seed) if n >= S.MIN_INTERVAL_N else None   # None: no interval
    out["psnr_vs_fp32"], out["psnr_vs_fp32_ci95"] = P.mean_with_interval(P.psnr(a, b), idx)
    if min(a.shape[-2:]) >= P.SSIM_WINDOW:
        out["ssim_vs_fp32"], out["ssim_vs_fp32_ci95"] = P.mean_with_interval(P.ssim(a, b), idx)
    out["paired_n"] = n
    return out
