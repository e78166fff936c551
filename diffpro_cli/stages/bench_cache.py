"""bench's cache rows (docs/caching.md): float weights on the reference schedule with a cache policy,
and the cache schedule a diffpro checkpoint carries.

- `cache-only`: the planner's schedule (WORKDIR/cache.json, planned here when missing or stale);
- `fbcache-T` (DiTs): the first-block threshold T users set by hand;
- `deepcache-N` (U-Nets): the deep part recomputed every N-th step (DeepCache's uniform interval);
- the `diffpro` row runs its checkpoint's schedule (on the schedule's timesteps) unless `--no-cache`;
  `diffpro-nocache` is the same checkpoint with every unit computed, on the plan's step subset.
"""

from __future__ import annotations

from diffpro_cli.artifacts import sha256_json
from diffpro_cli.stages.bench_options import checkpoint_identity

CACHE_ROWS = ("cache-only", "fbcache-0.08", "fbcache-0.12", "deepcache-2", "deepcache-3", "diffpro-nocache")


def cache_row(ctx, cfg, name: str, fp, ref_ts: list[int], fp_id: str, fp_bytes: int, notes: list[str]) -> list:
    """One float cache row (see the module docstring); skipped with a note where the network has no
    cacheable units of that kind."""
    from diffpro_cli.cache import CacheSchedule, FirstBlockCache, num_cache_units, policy_from_dict, unit_kind
    from diffpro_cli.errors import UsageError
    from diffpro_cli.planning.cache_plan import CachePlanConfig, cache_plan_for, interval_schedule
    from diffpro_cli.stages.bench import Row

    try:
        kind = unit_kind(fp.net)
    except UsageError:
        notes.append(f"{name} row skipped: caching runs on DiT transformer blocks or a U-Net's deep blocks, {fp.kind} has neither")
        return []
    n_units = num_cache_units(fp.net)
    tail = max(1, round(0.1 * len(ref_ts)))
    if name == "cache-only":
        rec, planned = cache_plan_for(fp, ref_ts, ctx.workdir, CachePlanConfig(seed=cfg.seed, cfg_scale=cfg.cfg_scale,
                                      latency_batch=cfg.latency_batch), ctx.ui, force=ctx.force)
        policy = policy_from_dict(rec["schedule"])
        row_notes = [f"cache plan: {rec['selected_by']} ({rec['policy']}), calibration drift {rec['drift']:.3g} at compute "
                     f"fraction {rec['compute_fraction']:.3f}" + (" (planned in this run)" if planned else " (cache.json)")]
    elif name.startswith("fbcache-"):
        if kind != "dit":
            notes.append(f"{name} row skipped: the first-block threshold is for DiTs (U-Nets: deepcache-2/3)")
            return []
        policy = FirstBlockCache(ref_ts, n_units, float(name.split("-", 1)[1]), tail)
        row_notes = [f"first-block threshold {policy.threshold}, protected last {tail} steps"]
    else:
        if kind != "unet":
            notes.append(f"{name} row skipped: DeepCache is for U-Nets (DiTs: fbcache-0.08/0.12)")
            return []
        k = int(name.split("-", 1)[1])
        policy = CacheSchedule(ref_ts, n_units, interval_schedule(len(ref_ts), n_units, k, 0))
        row_notes = [f"DeepCache: deep part (down_blocks[1:], mid, up_blocks[:-1]) recomputed every {k} steps"]
    row_notes.append("peak memory measured without the stored residuals (a fresh process runs the float model)")
    key = sha256_json(policy.as_dict())
    return [Row(name, fp, list(ref_ts), len(ref_ts), fp_bytes, 32.0, f"{name}:{fp_id}:{key}", notes=row_notes, cache=policy)]


def checkpoint_policy(qinfo: dict | None, use_cache: bool):
    """The cache policy the diffpro row runs: the checkpoint's schedule, unless turned off."""
    from diffpro_cli.cache import record_policy

    if qinfo is None or not use_cache:
        return None
    return record_policy(qinfo["meta"].get("cache"))


def diffpro_nocache_row(ctx, qinfo: dict | None, quantized, ts: list[int] | None, notes: list[str]) -> list:
    """The checkpoint with every unit computed on the plan's step subset (the bits+steps plan): what
    `--no-cache` makes of the diffpro row, kept beside it in the same report."""
    from diffpro_cli.stages.bench import Row

    if qinfo is None:
        notes.append("diffpro-nocache row skipped: no quantized checkpoint (run `diffpro quantize` or pass --quantized)")
        return []
    if not qinfo["meta"].get("cache"):
        notes.append("diffpro-nocache row skipped: the checkpoint has no cache section")
        return []
    if not qinfo["meta"]["cache"].get("enabled"):   # the diffpro row already is the plan without a cache
        notes.append("diffpro-nocache row skipped: the plan kept no cache schedule (" +
                     (qinfo["meta"]["cache"].get("verdict") or "disabled") + ")")
        return []
    if not ts:
        notes.append("diffpro-nocache row skipped: no timesteps (run `diffpro prune` or pass --timesteps)")
        return []
    qm = ctx.load(quantized)
    return [Row("diffpro-nocache", qm, list(ts), len(ts), qinfo["size_bytes"], qinfo["avg_bits"],
                f"diffpro-nocache:{checkpoint_identity(qinfo['meta'])}:{sha256_json(list(ts))}",
                load_spec=str(quantized), notes=["the diffpro checkpoint without its cache schedule, on the pruned steps"])]


def computed_share(row) -> list[list[float]]:
    """[step][unit]: the share of the row's network calls at that step that computed the unit
    (0/1 for a static schedule; the first-block policy decides per call)."""
    steps, units = len(row.timesteps), row.cache.num_units
    done = [[0] * units for _ in range(steps)]
    calls = [0] * steps
    for entry in row.cache_log:
        calls[entry["step"]] += 1
        for u in entry["computed"]:
            done[entry["step"]][u] += 1
    return [[d / c if c else 0.0 for d in ds] for ds, c in zip(done, calls)]


def schedule_figure(rows: list, path, notes: list[str]) -> dict:
    """Which units each cached row recomputed at which step (measured from its calls), one panel per
    row, written to `path`; returns {row: {"computed_share": [step][unit]}} for the report."""
    from diffpro_cli.plots import heatmap_on, new_figure, save_figure

    cached_rows = [r for r in rows if r.cache is not None and r.cache_log]
    if not cached_rows:
        return {}
    out = {r.name: {"units": r.cache.num_units, "steps": len(r.timesteps), "computed_share": computed_share(r)}
           for r in cached_rows}
    fig, axes = new_figure(len(cached_rows), 1, width=8.0, height=1.2 + 0.25 * max(r.cache.num_units for r in cached_rows))
    for ax, r in zip(axes if len(cached_rows) > 1 else [axes], cached_rows):
        share = out[r.name]["computed_share"]
        heatmap_on(ax, range(len(share) + 1), range(r.cache.num_units + 1), [list(c) for c in zip(*share)],
                   title=f"{r.name}: units recomputed per step (compute fraction {r.compute_fraction():.2f})",
                   xlabel="sampler step (0 = noisiest)", ylabel="unit", log_color=False,
                   color_label="computed (dark: reused)")
    fig.tight_layout()
    save_figure(fig, path)
    notes.append("cache schedules: bench/figures/cache_schedule.png (units recomputed at each step, per cached row)")
    return out
