"""allocate's `cache` section (issue #23, docs/caching.md): the bits+steps plan against cache schedules
on K..2K steps, priced with the measured cost table and the units' times, and the quality measure that
decides whether a schedule is kept (paired Inception features by default)."""

from __future__ import annotations

from typing import Callable

from diffpro_cli.errors import InputError
from diffpro_cli.stages.allocate import AllocateConfig


def joint_cache_section(ctx, cfg: AllocateConfig, plan: dict, doc: dict, timesteps: dict | None) -> dict:
    """The plan's `cache` section: the bits+steps plan (K steps) against cache schedules on K, 1.25K,
    1.5K, 2K steps priced with the cost table + the units' measured times, each measured against the
    float model on `full_steps` steps; enabled only when one is faster at no more drift (objective
    latency) or drifts less at the plan's latency (objective drift).
    Planned on the plan's network quantized in memory (round-to-nearest; float when static activations
    need calibration)."""
    import copy

    from diffpro_cli.planning.cache_plan import CachePlanConfig, block_latencies, plan_joint_cache, unit_layer_names
    from diffpro_cli.planning.costs import world_table
    from diffpro_cli.planning.joint import unit_latencies_under_plan
    from diffpro_cli.sampling import uniform_timesteps
    from diffpro_cli.stages.quantize import apply_plan

    model = ctx.model()
    n_train = model.num_train_timesteps
    base_ts = sorted(plan.get("timesteps") or uniform_timesteps(n_train, cfg.full_steps))
    sweep = {int(e["steps"]): list(e["timesteps"]) for e in (timesteps or {}).get("sweep") or []}
    cands = {k: sweep.get(k) or uniform_timesteps(n_train, k) for k in {round(len(base_ts) * r) for r in (1.25, 1.5, 2.0)}
             if k > len(base_ts)}
    static = any(e.get("act_mode") == "static" and e.get("weight_bits", 16) < 16 and e.get("act_bits", 8) < 16
                 for e in plan["layers"].values())
    qmodel = model if static else apply_plan(copy.deepcopy(model), plan)
    if not static and plan.get("compute_dtype") not in (None, "float32"):
        qmodel.set_compute_dtype(plan["compute_dtype"])   # drift as the checkpoint will run
    ccfg = CachePlanConfig(n=cfg.cache_n, batch=cfg.cache_n, seed=ctx.seed, latency_batch=cfg.batch,
                           proposals=("aligned", "interval"), step_cut=False)
    # the plan's own world: in a bf16 plan the float layers and the remainder cost their bf16 times, in a
    # compiled plan (allocate --compile) their compiled ones
    doc = world_table(doc, plan.get("world") or plan.get("compute_dtype") or "float32")
    fp_ms = {n: float(r["ms"]["fp32"]) for n, r in doc["layers"].items()}
    # each unit's share of the forward (timed together), on the cost table's float step of that world
    timed, forward_ms = block_latencies(model, ccfg, with_forward=True)
    fp_step = sum(fp_ms.values()) + float(doc.get("remainder_ms") or 0.0)
    block_ms = [b / forward_ms * fp_step for b in timed]
    unit_ms = unit_latencies_under_plan(block_ms, unit_layer_names(model.net, list(plan["layers"])), plan["layers"], fp_ms)
    step_ms = float(plan["totals"]["latency_ms"])
    metric, distance, definition = cache_distance(ctx, cfg, model)
    with ctx.ui.heartbeat("allocate: cache vs steps"):   # minutes of sampling with few lines of its own
        rec = plan_joint_cache(qmodel, model, base_ts, cands, step_ms, unit_ms, len(base_ts) * step_ms,
                               uniform_timesteps(n_train, cfg.full_steps), ccfg, ctx.ui,
                               objective=cfg.cache_objective, tolerance=cfg.cache_tolerance,
                               distance=distance, decode=distance is not None)
    chosen = rec.pop("chosen")
    K = len(base_ts)
    if cfg.cache_objective == "latency":
        verdict = (f"{chosen['steps']} steps with a cache schedule (compute {chosen['compute_fraction']:.2f}) are predicted "
                   f"{chosen['predicted_ms'] / rec['budget_ms']:.2f}x the time of {K} steps without, at no more drift "
                   f"({chosen['drift']:.3g} vs {rec['base']['drift']:.3g})" if chosen.get("cache") else
                   f"no cache: no cached schedule was faster than {K} steps without one at no more drift")
    else:
        verdict = (f"{chosen['steps']} steps with a cache schedule (compute {chosen['compute_fraction']:.2f}) drift less than "
                   f"{K} steps without, at the same predicted latency" if chosen.get("cache") else
                   f"no cache: {K} steps without one drift least at this latency")
    ctx.ui.info(f"allocate: {verdict}")
    return {"schema": "diffpro.cache/1", "enabled": chosen.get("cache") is not None, "schedule": chosen.get("cache"),
            "steps": chosen["steps"], "drift": chosen["drift"], "predicted_ms": chosen["predicted_ms"],
            "base_timesteps": base_ts, "verdict": verdict, "block_ms_fp32": block_ms,
            "priced_in": doc.get("world", "float32"),   # the float dtype of block_ms_fp32 and the unit times
            "unit_share_of_fp32_step": [b / forward_ms for b in timed],
            "planned_on": "float (static activations need calibration)" if static else "the plan quantized in memory (round-to-nearest)",
            "metric": metric, "drift_definition": f"{definition} vs the float model on {cfg.full_steps} uniform steps "
                                                  f"(same seeds and labels, {cfg.cache_n} samples)",
            "config": ccfg.as_dict(), **rec}


def cache_distance(ctx, cfg: AllocateConfig, model, metric: str | None = None) -> tuple[str, Callable | None, str]:
    """(metric used, distance for plan_joint_cache on decoded samples or None for its MSE, definition),
    built here so that planning/ needs no metrics/ (docs/caching.md: why inception is the default).
    "inception" falls back to mse, with one info line, when the Inception weights are missing or the
    decoded samples are not 1- or 3-channel images."""
    import torch

    mse = ("mse", None, "MSE of final samples (model space)")
    metric = metric or cfg.cache_metric   # the cache decision's, or allocate's step-cut check's (check_metric)
    if metric == "mse":
        return mse
    with torch.no_grad():
        channels = model.decode(torch.zeros(1, *model.sample_shape)).shape[1]
    if channels not in (1, 3):
        ctx.ui.info(f"allocate: inception distance needs 1- or 3-channel decoded images ({model.spec} decodes "
                    f"to {channels}); using mse")
        return mse
    from diffpro_cli.metrics.feature_distance import inception_distance

    try:
        distance = inception_distance()
    except InputError as exc:
        ctx.ui.info(f"allocate: inception distance: {exc.message.split(';')[0]}; using mse")
        return mse
    return "inception", distance, ("mean over samples of the squared L2 distance (/ 2048) of FID Inception pool3 features of "
                                    "the decoded samples")
