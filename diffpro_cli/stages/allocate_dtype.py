"""The compute dtype of a plan: where the machine runs bf16 in hardware, the cost table also holds a
"bfloat16" world (planning/costs.py: every path timed with the float math in bf16) and allocate solves
the plan in each world, keeping the one predicted fastest (with a latency budget: the least predicted
error among those that fit). The checkpoint records it; loading sets `DiffusionModel.compute_dtype`.

Why a plan-level choice and not per layer: a bf16 layer next to a float32 one pays a cast at every edge,
and the remainder (attention, norms, activations) follows the dtype of the whole forward; the cost table
times each world with its own casts, so the two plans are priced as they run.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffpro_cli.console import UI
from diffpro_cli.errors import BudgetError
from diffpro_cli.planning.costs_compiled import world_dtype

WORLDS = ("float32", "bfloat16")


@dataclass
class _SilentUI(UI):
    """Solves of every world run silent; the kept plan's warnings and verdict are printed once after."""

    def warn(self, message: str) -> None:
        pass


SILENT_UI = _SilentUI(quiet=True)


def _score(plan: dict, trades_latency: bool) -> tuple:
    totals = plan["totals"]
    if trades_latency:
        error = (plan.get("joint") or {}).get("combined_error", totals["error"])
        return (error, totals["latency_ms"])
    return (totals["latency_ms"], totals["error"])


def plan_per_world(solve_world, worlds: list[str], trades_latency: bool, ui,
                   float_steps: dict[str, float | None] | None = None) -> tuple[dict, dict | None]:
    """`solve_world(world) -> (plan, pareto)` in every world; the kept plan gains `compute_dtype` and
    `compute_dtypes` (each world's predicted step, error and float step: the record of the choice).
    A world whose budget cannot be met is skipped; if none can, the first world's error is raised.
    Worlds are cost-table worlds: a compute dtype ("float32", "bfloat16"), or a compiled one
    ("compiled-bfloat16", planning/costs_compiled.py), whose dtype becomes `compute_dtype` and whose
    name is kept as `world`.
    `float_steps`: every world's all-float step from the cost table, so the check against the fastest
    float also sees a world whose plan was infeasible."""
    results, first_error = {}, None
    for world in worlds:
        try:
            results[world] = solve_world(world)
        except BudgetError as exc:
            if first_error is None and world == worlds[0]:
                first_error = exc
    if not results:
        raise first_error
    best = min(results, key=lambda w: _score(results[w][0], trades_latency))
    plan, pareto = results[best]
    plan["compute_dtype"], plan["world"] = world_dtype(best), best
    plan["compute_dtypes"] = {
        w: {"step_ms": p["totals"]["latency_ms"], "error": p["totals"]["error"],
            "float_step_ms": (p.get("baseline_check") or {}).get("fp32_step_ms"),
            "integer_layers": p["execution"]["integer_layers"]}
        for w, (p, _) in results.items()}
    if len(results) > 1:
        line = ", ".join(f"{w} {r['step_ms']:.3g} ms (float alone {r['float_step_ms']:.3g})"
                         for w, r in plan["compute_dtypes"].items() if r["float_step_ms"] is not None)
        ui.info(f"allocate: float math in {best} (predicted per step: {line})")
    floats = {w: r["float_step_ms"] for w, r in plan["compute_dtypes"].items()}
    floats.update({w: v for w, v in (float_steps or {}).items() if v and not floats.get(w)})
    fastest_float = min((v for v in floats.values() if v), default=None)
    check = plan.get("baseline_check")
    if check is not None:
        check["float_dtype"] = best   # its fp32_step_ms / speed-up are against float computing in this dtype
    if check is not None and fastest_float:
        check["fastest_float_step_ms"] = fastest_float
        check["speedup_vs_fastest_float_same_steps"] = fastest_float / check["plan_step_ms"]
        fastest = min(floats, key=lambda w: floats[w] or float("inf"))
        check["fastest_float_dtype"] = fastest
        if fastest_float < check["plan_step_ms"]:
            check["verdict"] += (f"; WARNING: float alone in {fastest} is faster at the same steps "
                                 f"({fastest_float:.3g} vs {check['plan_step_ms']:.3g} ms)")
        elif fastest != best:
            check["verdict"] += f"; {fastest_float / check['plan_step_ms']:.2f}x float alone in {fastest}, the fastest float here"
    return plan, pareto
