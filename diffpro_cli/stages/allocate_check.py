"""allocate's measured check against the float step cut (issue #19, item 3; docs/planning.md).

A user who does not quantize can spend the plan's latency on float steps instead: ddim-K' with K' the
most uniform steps whose float time fits the plan's (both forwards timed here; `baseline_check`'s
prediction is kept beside it). Predicted error
(quantization error + step drift) cannot say which is closer to fp32, because its two terms are in
different units. So both are measured in one unit, end to end, on the same seeded calibration batch:
the plan's network quantized in memory as quantize will write it (`check_rounding`, which `run` takes
from [quantize] rounding; this CPU's pair bound; the kernels the cost table chose) on the plan's timesteps,
and the float model on K' uniform steps, each against the float model on `full_steps` uniform steps
(bench's fp32 reference), by paired Inception-feature distance (what FID vs fp32 is computed from;
MSE where Inception cannot run). With a joint latency budget, every feasible step count's plan is
measured and the closest to fp32 is kept: the step count is chosen on measured quality, not on
`drift + quant_weight × error`.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch

from diffpro_cli.stages.allocate import AllocateConfig

CHECK_SCHEMA = "diffpro.step-cut-check/1"


def per_sample_mse(candidate: torch.Tensor, teacher: torch.Tensor) -> np.ndarray:
    return ((candidate.double() - teacher.double()) ** 2).flatten(1).mean(1).numpy()


def paired_verdict(plan_d: np.ndarray, cut_d: np.ndarray, seed: int, resamples: int = 2000) -> dict:
    """Per-sample distances to fp32 of the plan and the float step cut (same seeds): the mean of
    (cut − plan) (> 0: the plan is closer), its seeded bootstrap 95 % interval, and who is closer when
    the interval excludes 0."""
    from diffpro_cli.metrics.stats import bootstrap_indices, excludes_zero, interval

    d = np.asarray(cut_d, dtype=np.float64) - np.asarray(plan_d, dtype=np.float64)
    est = float(d.mean())
    ci = interval(d[bootstrap_indices(len(d), resamples, seed)].mean(axis=1), est) if len(d) > 1 else None
    winner = ("plan" if est > 0 else "float step cut") if excludes_zero(ci) else None
    return {"mean_cut_minus_plan": est, "ci95": ci, "n": len(d), "bootstrap": {"resamples": resamples, "seed": seed},
            "closer_to_fp32": winner}


def time_forwards(model, q, float_world: str | None, batch: int, repeats: int, seed: int) -> dict:
    """The plan's network and the fastest float (its world's dtype; eager) timed on the same forward
    (cost-table inputs: seeded noise, mid timestep, default labels), round-robin, minimum of `repeats`."""
    from diffpro_cli.planning.costs import capture_inputs, interleaved_min_ms
    from diffpro_cli.planning.costs_compiled import world_dtype

    dtype = world_dtype(float_world or "float32")
    fl = model if dtype == "float32" else copy.deepcopy(model).set_compute_dtype(getattr(torch, dtype))
    _, (x, t, y) = capture_inputs(model, {}, batch, seed)
    with torch.no_grad():
        ms = interleaved_min_ms({"plan": lambda: q.eps(x, t, y), "float": lambda: fl.eps(x, t, y)}, repeats, device=str(x.device))
    return {"batch": batch, "repeats": repeats, "float_dtype": dtype, "plan_ms": ms["plan"], "float_ms": ms["float"],
            "plan_speedup": ms["float"] / ms["plan"]}


def select_measured(candidates: list[dict]) -> dict:
    """The candidate with the least measured distance to fp32; ties keep the fewer steps (cheaper)."""
    ok = [c for c in candidates if c.get("distance") is not None]
    return min(ok, key=lambda c: (c["distance"], c["steps"]))


def verdict_line(rec: dict, size_budget: str | None) -> str:
    plan, cut, v, fw = rec["plan"], rec["float_step_cut"], rec["paired"], rec.get("forward")
    speed = "" if fw is None else (f" (its forward {fw['plan_speedup']:.2f}x {fw['float_dtype']}'s)" if fw["plan_speedup"] >= 1
                                   else f" (its forward {1 / fw['plan_speedup']:.2f}x SLOWER than {fw['float_dtype']}'s)")
    head = (f"measured against fp32 ({rec['metric']}, {rec['n']} samples): the plan on {plan['steps']} steps "
            f"{plan['distance']:.4g}{speed}, float DDIM on {cut['steps']} steps (same measured latency) {cut['distance']:.4g}")
    if v["closer_to_fp32"] == "plan":
        return head + ": the plan is closer to fp32"
    if v["closer_to_fp32"] is None:
        return head + ": no significant difference"
    why = (f"it stores float weights, which {size_budget} excludes" if size_budget else
           "quantization costs more quality here than cutting steps; a joint plan (prune --sweep, then "
           "--budget latency=F) chooses steps and bits on measured quality")
    return head + f": FEWER FLOAT STEPS WIN ({why})"


def step_cut_check(ctx, cfg: AllocateConfig, plan: dict, timesteps: dict | None,
                   plan_for_steps: Callable[[int], dict] | None = None, finish: Callable[[dict], dict] = lambda p: p) -> dict:
    """Returns the plan to write, with `step_cut_check` set (and, in joint mode, the measured step
    count: `plan_for_steps(K)` solves the plan for K steps, `finish` attaches its kernels). Without
    a step count or a float step of the same latency, the record says why nothing was measured."""
    from diffpro_cli.planning.options import parse_budgets
    from diffpro_cli.sampling import SamplerConfig, default_labels, sample, uniform_timesteps
    from diffpro_cli.stages.allocate_cache import cache_distance

    base = plan.get("baseline_check") or {}
    if not plan.get("timesteps") or not base.get("float_steps_same_latency"):
        plan["step_cut_check"] = {"schema": CHECK_SCHEMA, "skipped": "no step count to compare at: pass --timesteps "
                                  "timesteps.json from `diffpro prune` (diffpro run does), or the cost table has no float step"}
        return plan
    model = ctx.model()
    N = model.num_train_timesteps
    n = cfg.check_n
    metric, distance, definition = cache_distance(ctx, cfg, model, metric=cfg.check_metric)
    per_sample = getattr(distance, "per_sample", None) or per_sample_mse
    cfg_scale = float(((timesteps or {}).get("teacher") or {}).get("cfg_scale") or 1.0)
    sampler = SamplerConfig(method="ddim", eta=0.0, cfg_scale=cfg_scale)
    labels = default_labels(model, n)

    advance = [lambda k=1: None]   # the progress bar's, once it is open

    def final(m, ts) -> torch.Tensor:
        return sample(m, n, sorted(ts), sampler, labels=labels, seed=ctx.seed, batch_size=n,
                      decode=distance is not None, advance=advance[0])

    from diffpro_cli.stages.quantize import QuantizeConfig, quantize_in_memory

    qcfg = QuantizeConfig(rounding=cfg.check_rounding, seed=ctx.seed)
    hessians: dict = {}   # GPTQ inputs, calibrated once (on the first plan's timesteps) for every candidate

    def quantized(p: dict):
        q, used = quantize_in_memory(model, p, sorted(p["timesteps"]), qcfg, hessians)
        hessians.update(used or {})
        if p.get("compute_dtype") not in (None, "float32"):
            q.set_compute_dtype(p["compute_dtype"])   # as the checkpoint will run
        return q

    ui = ctx.ui
    joint = plan.get("joint")
    others = [r["steps"] for r in (joint or {}).get("candidates") or [] if r.get("feasible") and r["steps"] != joint["steps"]] \
        if plan_for_steps is not None else []
    k_max = max([len(plan["timesteps"]), *others])   # the kept plan's own K and the cut's K' are at most this
    total = n * (cfg.full_steps + len(plan["timesteps"]) + sum(others) + 2 * k_max)
    ui.info(f"allocate: measuring the plan against the float step cut ({metric}, {n} samples, "
            f"fp32 on {cfg.full_steps} steps as the reference; --no-check skips it)")
    with ui.progress("allocate: plan vs float step cut (sampling steps)", total=total) as bar:
        advance[0] = bar
        teacher = final(model, uniform_timesteps(N, cfg.full_steps))

        def measured(p: dict) -> tuple[np.ndarray, object]:
            q = quantized(p)
            return per_sample(final(q, p["timesteps"]), teacher), q

        plan_d, plan_q = measured(plan)
        if others:
            chosen_k = joint["steps"]
            best, kept = {"steps": chosen_k, "distance": float(plan_d.mean())}, None
            for row in joint["candidates"]:
                if row["steps"] == chosen_k:
                    row["measured_distance"] = best["distance"]
                elif row.get("feasible"):
                    p = finish(plan_for_steps(row["steps"]))
                    d, q = measured(p)
                    row["measured_distance"] = float(d.mean())
                    cand = {"steps": row["steps"], "distance": row["measured_distance"]}
                    if select_measured([best, cand]) is cand:   # only the leader's network is kept (timed below)
                        best, kept = cand, (p, d, q)
            if kept is not None:
                ui.info(f"allocate: {best['steps']} steps are closer to fp32 than the predicted choice {chosen_k} "
                        f"(measured {best['distance']:.4g} vs {plan_d.mean():.4g}); keeping {best['steps']}")
                plan, plan_d, plan_q = kept
                plan["joint"]["candidates"] = joint["candidates"]
            plan["joint"]["selected_by"] = "measured distance to fp32"
            plan["joint"]["predicted_choice"] = chosen_k
        base = plan["baseline_check"]
        forward = time_forwards(model, plan_q, base.get("fastest_float_dtype") or base.get("float_dtype"),
                                cfg.batch, min(cfg.repeats, 9), ctx.seed)
        K = len(plan["timesteps"])   # the float steps that cost the plan's MEASURED time (the table's prediction is kept)
        k_cut = max(1, min(cfg.full_steps, math.floor(K * forward["plan_ms"] / forward["float_ms"] + 1e-9)))
        cut_d = per_sample(final(model, uniform_timesteps(N, k_cut)), teacher)
        same_d = per_sample(final(model, plan["timesteps"]), teacher)
    rec = {"schema": CHECK_SCHEMA, "metric": metric, "definition": f"{definition} vs the float model on {cfg.full_steps} "
           f"uniform DDIM steps (same seeds and labels)", "n": n, "seed": ctx.seed, "cfg_scale": cfg_scale,
           "plan": {"steps": len(plan["timesteps"]), "distance": float(plan_d.mean()),
                    "quantized_in_memory": f"as quantize writes it ({cfg.check_rounding} rounding), on the cost table's kernels"},
           "float_step_cut": {"steps": k_cut, "distance": float(cut_d.mean()), "timesteps": "uniform (bench's ddim row)",
                              "predicted_steps": int(base["float_steps_same_latency"]),
                              "steps_from": "the measured forward times: floor(K x plan / float)"},
           "forward": forward,
           "float_same_timesteps": {"steps": len(plan["timesteps"]), "distance": float(same_d.mean())},
           "paired": paired_verdict(plan_d, cut_d, ctx.seed)}
    size = [b for b in parse_budgets(cfg.budget) if b.kind in ("avg-bits", "size-mb")]
    rec["verdict"] = verdict_line(rec, f"{size[0].kind}={size[0].value:g}" if size else None)
    ui.info(f"allocate: {rec['verdict']}")
    plan["step_cut_check"] = rec
    return plan
