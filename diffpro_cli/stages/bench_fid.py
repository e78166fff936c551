"""bench's quality half: Inception features of every row (cached, sharded over torchrun ranks) and the
FID / KID / paired metrics computed from them (metrics.evidence). Split from bench.py, which times,
sizes and reports."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import UsageError

FEATURE_DIM = 2048   # Inception pool3 (metrics.fid.inception_features)

if TYPE_CHECKING:
    from diffpro_cli.stages.bench import BenchConfig, Row


def row_features(row: Row, cfg: BenchConfig, n: int, inception, cache, ui: UI = QUIET_UI) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Inception features of the row's first n seeded samples (cached; sharded over torchrun ranks),
    its first `grid_n` samples for the figure, and its first min(n, PAIRED_N) samples as uint8 for the
    paired metrics (cached beside the features; on rank 0 under torchrun: its shard's share)."""
    from diffpro_cli.distributed import is_main, sharded_map
    from diffpro_cli.metrics.fid import FeatureCache, inception_features
    from diffpro_cli.metrics.paired import PAIRED_N, load_paired, save_paired
    from diffpro_cli.mnist import to_uint8

    key = FeatureCache.key(identity=row.identity, ts=row.timesteps, steps=row.steps, method=cfg.method,
                           cfg=cfg.cfg_scale, seed=cfg.seed, **kernel_variant(row, cfg))
    n_paired = min(n, PAIRED_N)
    feats = cache.get(key, n)
    grid = {}
    if feats is None or len(feats) < n:
        with ui.progress(f"sampling + inception {row.name}", total=n * (row.steps + 1)) as advance:
            def work(start: int, count: int) -> np.ndarray:
                x = row.sampler(cfg, count, cfg.sample_batch, first_index=start, advance=advance)
                if start == 0:
                    grid["x"], grid["paired"] = x[:cfg.grid_n], to_uint8(x[:n_paired])
                return inception_features(x, inception, advance=advance)

            feats = sharded_map(n, work)
        if is_main():
            cache.put(key, feats, meta={"row": row.name})
            if "paired" in grid:
                save_paired(cache.directory, key, grid["paired"])
    if not is_main():   # other ranks only contribute features (measure_bench reports on rank 0)
        return feats, grid.get("x"), None
    if "paired" not in grid:
        grid["paired"] = load_paired(cache.directory, key, n_paired)
    if grid["paired"] is None:   # features cached by an older version: sample the paired images once
        grid["paired"] = to_uint8(row.sampler(cfg, n_paired, cfg.sample_batch))
        save_paired(cache.directory, key, grid["paired"])
    if "x" not in grid:
        grid["x"] = grid["paired"][:cfg.grid_n].float() / 127.5 - 1 if cfg.grid_n <= len(grid["paired"]) \
            else row.sampler(cfg, min(cfg.grid_n, n), cfg.sample_batch)
    return feats, grid["x"], grid["paired"]


def kernel_variant(row: Row, cfg: BenchConfig) -> dict:
    """What else decides a row's samples: compiled kernels (--compile: the oneDNN int8 path, inductor's
    fusions) and a GPU compute other numbers than the eager CPU kernels, so their features are not
    an eager CPU run's. Empty for eager CPU rows (the keys features were always cached under)."""
    from diffpro_cli.devices import net_device

    variant = {"compiled": True} if cfg.compile else {}
    try:
        kind = net_device(row.model.net).type
    except AttributeError:   # a model without a plain .net: keyed as before
        kind = "cpu"
    return variant | ({"device": kind} if kind != "cpu" else {})


def fid_inputs(rows: list[Row], cfg: BenchConfig, device: str = "cpu") -> tuple:
    """(Inception network, (mu, sigma, n) of the reference): checked before any measuring, so a bad
    --reference or missing Inception weights fail at once, not after minutes of timing."""
    from diffpro_cli.errors import InputError
    from diffpro_cli.metrics.fid import load_inception, load_reference_stats

    for row in rows:
        if row.model.random_weights:
            raise UsageError(f"{row.model.spec} has random weights: FID is meaningless; drop --fid (speed and memory only)")
    reference = load_reference_stats(cfg.reference)
    if len(reference[0]) != FEATURE_DIM:   # else the FID of every row fails after all of its sampling
        raise InputError(f"--reference {cfg.reference}: statistics of {len(reference[0])}-d features, not Inception's "
                         f"{FEATURE_DIM}-d pool3; make them with `diffpro fid-stats`")
    return load_inception(cfg.inception_weights, device=device), reference


def fid_for_rows(rows: list[Row], cfg: BenchConfig, workdir: Path, inception, reference: tuple,
                 ui: UI = QUIET_UI) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per row: FID and FID vs fp32 with bootstrap intervals, KID, PSNR/SSIM vs fp32 (metrics.evidence),
    from features computed once; "_replicates" holds the paired bootstrap for derived/versus_step_cut."""
    from diffpro_cli.distributed import is_main
    from diffpro_cli.metrics import evidence
    from diffpro_cli.metrics.fid import FeatureCache
    from diffpro_cli.metrics.reference import reference_features, reference_size

    mu_ref, sigma_ref, ref_n = reference
    cache = FeatureCache(workdir / "bench" / "fid-cache")
    feats, samples, paired = {}, {}, {}
    for row in rows:
        feats[row.name], samples[row.name], paired[row.name] = row_features(row, cfg, cfg.fid_n, inception, cache, ui)
    if not is_main():
        return {}, samples
    ref_feats, ref_info = reference_features(cfg.reference, reference_size(cfg.fid_n), inception, cache, ui=ui)
    results, replicates = evidence.measure_rows(feats, paired, mu_ref, sigma_ref, ref_feats, seed=cfg.seed)
    results["_reference_n"] = ref_n
    results["_replicates"] = replicates
    results["_evidence"] = evidence.settings(cfg.seed, kid_reference=ref_info)
    return results, samples
