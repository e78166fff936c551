"""Steps x bits: the joint plan over the pruned step counts, and the Pareto front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import BudgetError, InputError, UsageError
from diffpro_cli.planning.options import METHODS, Budget
from diffpro_cli.planning.solvers import (Constraint, Solution, Table, budget_value, chosen_total, smallest_feasible,
                                          solve, summarize, _require_latency)

PARETO_SCHEMA = "diffpro.pareto/1"

@dataclass
class StepEntry:
    steps: int
    timesteps: list[int]
    drift: float | None


def _checked_entry(entry, where: str, path, num_train: int) -> StepEntry:
    """One step count of timesteps.json, checked: a damaged sweep entry was a KeyError / TypeError traceback,
    or it reached plan.json as is (timesteps out of range or not increasing, a step count that is not the
    subset's length, a NaN or negative drift that the joint choice compares against)."""
    from diffpro_cli.sampling import timesteps_of

    if not isinstance(entry, dict) or not isinstance(entry.get("timesteps"), list):
        raise InputError(f"{path}: its {where} has no list of timesteps; re-run `diffpro prune`")
    ts = timesteps_of({"timesteps": entry["timesteps"]}, f"{path} ({where})", num_train)
    steps = entry.get("steps")
    if steps is not None and (isinstance(steps, bool) or steps != len(ts)):
        raise InputError(f"{path}: its {where} says {steps!r} steps but lists {len(ts)}; re-run `diffpro prune`")
    drift = entry.get("drift")
    if drift is not None and (isinstance(drift, bool) or not isinstance(drift, (int, float))
                              or not math.isfinite(drift) or drift < 0):
        raise InputError(f"{path}: its {where} has drift {drift!r}, not a finite number >= 0; re-run `diffpro prune`")
    return StepEntry(len(ts), ts, None if drift is None else float(drift))


def step_entries(cfg, timesteps: dict | None, num_train: int = 1000, path="timesteps.json") -> list[StepEntry]:
    """Candidate step counts for the joint plan: the artifact's sweep (--steps auto), one of its entries
    (--steps K), its single subset, or the uniform subset of K steps when no artifact is given."""
    if timesteps is None:
        if cfg.steps is None or cfg.steps == "auto":
            raise UsageError("a latency budget (--budget latency=F or --latency-budget MS) chooses among pruned step counts: "
                             "run `diffpro prune --sweep` into this workdir, pass --timesteps timesteps.json, or --steps K "
                             "(the uniform subset of K steps)")
        from diffpro_cli.sampling import uniform_timesteps

        k = _int_steps(cfg.steps)
        return [StepEntry(k, uniform_timesteps(num_train, k), None)]
    num_train = int(timesteps.get("num_train_timesteps") or num_train)
    sweep = timesteps.get("sweep") or []
    if not isinstance(sweep, list):
        raise InputError(f"{path}: its sweep is not a list; re-run `diffpro prune`")
    top = _checked_entry({**timesteps, "steps": None}, "timesteps", path, num_train)   # a plan without steps carries it
    entries = [_checked_entry(s, f"sweep entry {i}", path, num_train) for i, s in enumerate(sweep)] or [top]
    if cfg.steps is None or cfg.steps == "auto":
        return entries
    k = _int_steps(cfg.steps)
    match = [e for e in entries if e.steps == k]
    if not match:
        raise UsageError(f"--steps {k}: the timesteps artifact has step counts {sorted(e.steps for e in entries)}; "
                         f"pick one, pass --steps auto, or re-run prune with --sweep {k}")
    return match


def _int_steps(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--steps {text!r}: use a step count or auto") from None
    if k < 1:
        raise UsageError(f"--steps {k}: must be at least 1")
    return k


def solve_joint(table: Table, cfg, entries: list[StepEntry], extra: list[Constraint],
                remainder_ms: float, ui: UI = QUIET_UI) -> tuple[StepEntry, Solution, list[dict]]:
    """For every step count K: per-step latency ≤ budget / K; keep the least drift + weight × quant error."""
    _require_latency(table, "--latency-budget")
    rows, best = [], None
    for e in sorted(entries, key=lambda e: e.steps):
        per_step = cfg.latency_budget / e.steps
        k = Constraint("latency-ms", table.latency, per_step - remainder_ms)
        sol = solve(table, [k] + extra, cfg.method, cfg.time_limit) if smallest_feasible(table, k) <= k.limit else None
        row = {"steps": e.steps, "per_step_budget_ms": per_step, "feasible": sol is not None, "drift": e.drift}
        if sol is not None:
            q = float(chosen_total(table.error, sol.choice))
            combined = (e.drift or 0.0) + cfg.quant_weight * q
            row.update(quant_error=q, combined_error=combined,
                       per_step_ms=chosen_total(table.latency, sol.choice) + remainder_ms,
                       total_latency_ms=e.steps * (chosen_total(table.latency, sol.choice) + remainder_ms))
            if best is None or combined < best[2]:
                best = (e, sol, combined)
        rows.append(row)
    if best is None:
        cheapest = min(e.steps * (smallest_feasible(table, Constraint("", table.latency, 0)) + remainder_ms) for e in entries)
        k_min = min(entries, key=lambda e: e.steps).steps
        raise BudgetError(f"--latency-budget {cfg.latency_budget:g} ms is infeasible: the smallest feasible is "
                          f"{math.ceil(cheapest * 1000) / 1000:g} ms ({k_min} steps at the cheapest bits); raise it or prune to fewer steps")
    return best[0], best[1], rows



def pareto_front(table: Table, cfg, budget: Budget | None, constraints: list[Constraint],
                 remainder_ms: float, other_bytes: int, timesteps: dict | None, plan: dict, points: int = 12) -> dict:
    """Sweep the budget from the smallest feasible value to the one where nothing binds; MILP and CDF
    rule at each (joint mode: the joint plan at each total latency)."""
    out = []
    if cfg.latency_budget is not None:
        entries = step_entries(cfg, timesteps)
        per_step_lo = smallest_feasible(table, Constraint("", table.latency, 0)) + remainder_ms
        lo = min(e.steps for e in entries) * per_step_lo
        hi = max(e.steps for e in entries) * (float(np.max(np.where(table.valid, table.latency, -np.inf), axis=1).sum()) + remainder_ms)
        for value in np.linspace(lo, max(hi, lo), points):
            sub = dataclasses.replace(cfg, latency_budget=float(value) * (1 + 1e-9), pareto=False)
            try:
                entry, sol, _ = solve_joint(table, sub, entries, [], remainder_ms)
            except BudgetError:
                continue
            q = float(chosen_total(table.error, sol.choice))
            per_step = chosen_total(table.latency, sol.choice) + remainder_ms
            out.append({"method": "joint", "budget": float(value), "steps": entry.steps, "total_latency_ms": entry.steps * per_step,
                        "error": (entry.drift or 0.0) + cfg.quant_weight * q, "quant_error": q})
        x, x_label = "total_latency_ms", "total latency per image (ms)"
        chosen = {"total_latency_ms": plan["joint"]["total_latency_ms"], "error": plan["joint"]["combined_error"]}
    else:
        k0 = constraints[0]
        lo = smallest_feasible(table, k0)
        best_err = np.where(table.valid, table.error, np.inf).argmin(axis=1)
        hi = max(chosen_total(k0.cost, best_err.tolist()), lo)
        for value in np.linspace(lo, hi, points):
            k = Constraint(k0.name, k0.cost, float(value) if k0.name == "latency-ms" else math.floor(value))
            for method in METHODS:
                sol = solve(table, [k, *constraints[1:]], method, cfg.time_limit)
                if sol is not None:
                    s = summarize(table, sol, remainder_ms, other_bytes)
                    out.append({"method": method, "budget": budget_value(table, budget, k.limit, remainder_ms, other_bytes), **{key: s[key] for key in ("avg_bits", "bytes", "latency_ms", "error")}})
        x = "latency_ms" if budget.kind == "latency-ms" else "avg_bits"
        x_label = "latency per step (ms)" if x == "latency_ms" else "average weight bits"
        chosen = {x: plan["totals"][x], "error": plan["totals"]["error"]}
    method = "joint" if cfg.latency_budget is not None else "milp"
    front = [p for p in out if p["method"] == method and not any(
        q["method"] == method and q[x] <= p[x] and q["error"] <= p["error"] and (q[x] < p[x] or q["error"] < p["error"]) for q in out)]
    return {"schema": PARETO_SCHEMA, "x": x, "x_label": x_label, "points": out,
            "front": sorted(front, key=lambda p: p[x]), "chosen": chosen,
            "title": f"predicted error vs {x_label}"}



def float_step_cut_check(table, sol, remainder_ms: float, step_list, timesteps: dict | None, joint: dict | None) -> dict | None:
    """The plan against what a user gets by cutting steps alone in float (ddim-K / fp32-subset-K): the
    predicted speed-up at the same step count, and the float step count that costs the plan's latency
    with its drift when prune measured it. A plan that does not beat float at the same steps says so."""
    if table.fp_latency is None or np.isnan(table.fp_latency).any():
        return None
    fp_step = float(table.fp_latency.sum()) + remainder_ms
    plan_step = float(chosen_total(table.latency, sol.choice)) + remainder_ms
    ratio = fp_step / plan_step
    ints = sum(1 for i, j in enumerate(sol.choice) if not table.options[j].full_precision and table.options[j].act_bits < 16)
    out = {"fp32_step_ms": fp_step, "plan_step_ms": plan_step, "speedup_vs_float_same_steps": ratio, "integer_layers": ints}
    k = len(step_list) if step_list else None
    if k:
        k_float = max(1, int(k * plan_step / fp_step))
        out.update(steps=k, float_steps_same_latency=k_float)
        sweep = {int(e["steps"]): e.get("drift") for e in (timesteps or {}).get("sweep") or []}
        if joint is not None and k_float in sweep and sweep[k_float] is not None:
            out.update(float_drift_same_latency=sweep[k_float], plan_combined_error=joint["combined_error"])
    if ints == 0:
        out["verdict"] = ("no integer kernel beats float compute on this machine: every layer runs in float from its "
                          "stored low-bit weights (the plan saves size; its speed-up is the step cut's)")
    elif ratio < 1.0:
        out["verdict"] = (f"WARNING: predicted {ratio:.2f}x of float at the same steps; quantized compute does not pay "
                          f"here: allow float execution (--act-bits 8,16) to keep float compute")
    else:
        out["verdict"] = (f"predicted {ratio:.2f}x faster per step than float at the same steps "
                          f"({ints} layers on integer kernels)" + (f"; float alone at this latency: {out['float_steps_same_latency']} steps" if k else ""))
    return out


# ---------------------------------------------------------------------------------------------
# bits × steps × cache: the same predicted latency spent on more steps with reused computation
# ---------------------------------------------------------------------------------------------


def unit_latencies_under_plan(block_ms: list[float], unit_layers: list[list[str]], plan_layers: dict,
                              fp_ms: dict[str, float]) -> list[float]:
    """ms per image of each cacheable unit under the plan: the unit's measured float time with each of
    its planned layers' fp32 time replaced by the chosen option's (both from the cost table)."""
    out = []
    for ms, names in zip(block_ms, unit_layers):
        delta = sum((plan_layers[n].get("latency_ms") or fp_ms[n]) - fp_ms[n] for n in names if n in plan_layers and n in fp_ms)
        out.append(max(ms + delta, 0.05 * ms))
    return out


def schedule_latency_ms(step_ms: float, unit_ms: list[float], computed: list) -> float:
    """Predicted ms per image of a schedule: every step costs step_ms, less each unit it reuses."""
    return sum(step_ms - sum(c for u, c in enumerate(unit_ms) if u not in s) for s in computed)


def cache_fraction_for(step_ms: float, unit_ms: list[float], steps: int, budget_ms: float) -> float:
    """The largest share of the units' time that `steps` steps may compute within `budget_ms`
    (steps × (step − U) + f × steps × U ≤ budget); ≤ 0 or below the schedule's floor: infeasible."""
    U = sum(unit_ms)
    return (budget_ms - steps * (step_ms - U)) / (steps * U) if U > 0 else float("-inf")


def select_joint_cache(base: dict, candidates: list[dict], budget_ms: float) -> dict:
    """The least measured drift among the bits+steps plan (`base`) and the cached candidates whose
    predicted latency is within the budget; ties keep the plan without a cache."""
    ok = [c for c in candidates if c.get("drift") is not None and c["predicted_ms"] <= budget_ms * (1 + 1e-9)]
    best = min(ok, key=lambda c: c["drift"], default=None)
    return best if best is not None and best["drift"] < base["drift"] else base


def select_fastest_cache(base: dict, candidates: list[dict], tolerance: float = 0.0) -> dict:
    """The least predicted latency among the cached candidates that drift no more than the bits+steps
    plan (`base`, within `tolerance` as a fraction of its drift) and are predicted faster than it; ties
    keep the lower drift. None such: the plan without a cache."""
    limit = base["drift"] * (1 + tolerance)
    ok = [c for c in candidates if c.get("drift") is not None and c["drift"] <= limit
          and c["predicted_ms"] < base["predicted_ms"] * (1 - 1e-9)]
    return min(ok, key=lambda c: (c["predicted_ms"], c["drift"]), default=base)

