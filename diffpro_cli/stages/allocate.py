"""Per-layer bit allocation under a budget, solved exactly as a mixed-integer program (docs/planning.md).

The cost table has one row per quantizable layer (from scores.json) and one column per option
(weight bits × activation bits). Each cell carries:
- size in bits: weight elements × bits + fp32 scales (per output channel, or per group) + fp32 bias;
  a 16-bit option means "kept in full precision" and is counted at 32 bits (fp32);
- predicted error: measured single-layer error when `score --measure` ran (other bit widths
  extrapolated as error ∝ 4^-bits), else the combined score × 4^-bits; activation quantization at a
  bits adds the same per-bit term E(a); full precision adds nothing;
- latency: the layer's forward at its real input shape, MEASURED with the integer kernels of
  `diffpro_cli.quant.layers` on this machine (cached in WORKDIR/cost_table.json).
The MILP picks exactly one option per layer (one-hot binaries), keeps every budget row, and minimises
the summed predicted error. `--method cdf` is the paper's rank/CDF-threshold rule, for comparison.
The joint plan sweeps step counts: total latency = steps × (Σ chosen layer latencies + non-GEMM
remainder), predicted quality = drift(steps) + quant_weight × quantization error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import BudgetError, InputError, UsageError
from diffpro_cli.planning.costs import CostTable, _kernels, measure_remainder_ms, measured_latency_fn
from diffpro_cli.planning.error_model import error_model
from diffpro_cli.planning.joint import pareto_front, solve_joint, step_entries
from diffpro_cli.planning.options import (DEFAULT_PROTECT, METHODS, Layer, Option, load_layers, make_options,
                                          parse_budget)
from diffpro_cli.planning.solvers import (budget_constraint, build_table, infeasible_message, plan_layers,
                                          predicted_speedup, smallest_feasible, solve, speedup_constraint, summarize)

PLAN_SCHEMA = "diffpro.plan/1"
SCORES_SCHEMA = "diffpro.scores/1"
TIMESTEPS_SCHEMA = "diffpro.timesteps/1"
LATENCY_SOURCES = ("measured", "analytic")

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class AllocateConfig:
    budget: str | None = None            # "avg-bits=5.0" | "size-mb=3" | "latency-ms=2.5" (per step, batch 1)
    bits: list[int] = field(default_factory=lambda: [4, 8, 16])
    act_bits: list[int] = field(default_factory=lambda: [8])   # DAQ on every quantized layer (see docs/planning.md)
    act_mode: str = "dynamic"
    group_size: int | None = None
    method: str = "milp"
    protect: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECT))
    protect_bits: int = 8
    latency_budget: float | None = None  # joint plan: total ms per image over all steps
    min_speedup: float | None = None     # per-step latency ≤ the fp32 step's / this (measured kernels, same run)
    steps: str | None = None             # joint plan: "auto" (the artifact's sweep) or a step count
    quant_weight: float = 1.0            # joint plan: units of quantization error per unit of drift
    tokens: int | None = None            # tokens per image when scores.json has no MACs
    latency_source: str = "measured"     # measured (real kernels) | analytic (labelled estimate)
    repeats: int = 5
    remainder_ms: float | None = None    # non-GEMM time per step; None → measured from the model
    pareto: bool = False
    time_limit: float = 60.0
    error_model: str = "auto"            # auto | measured | proxy | score | cdf (see error_model())

    def as_dict(self) -> dict:
        return asdict(self)



def allocate_plan(scores: dict, cfg: AllocateConfig, *, latency_fn: Callable[[Layer, Option], float] | None = None,
                  remainder_ms: float = 0.0, remainder_source: str = "given", latency_source: str = "given",
                  timesteps: dict | None = None, scores_path: str | Path = "scores.json", ui: UI = QUIET_UI) -> tuple[dict, dict | None]:
    """The plan.json payload (and the Pareto payload with cfg.pareto). Pure: writes nothing."""
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method}: use milp or cdf")
    if cfg.budget is None and cfg.latency_budget is None:
        raise UsageError("no budget: pass --budget avg-bits=5.0 (or size-mb=… / latency-ms=…) or --latency-budget MS with --timesteps")
    if cfg.latency_budget is not None and cfg.latency_budget <= 0:
        raise UsageError(f"--latency-budget {cfg.latency_budget}: must be a positive number of milliseconds per image")
    if cfg.min_speedup is not None and not (math.isfinite(cfg.min_speedup) and cfg.min_speedup > 0):
        raise UsageError(f"--min-speedup {cfg.min_speedup}: must be a positive ratio against fp32, e.g. 1.5")
    budget = parse_budget(cfg.budget) if cfg.budget else None
    layers = load_layers(scores, scores_path)
    options = make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    proxy_bits = int((scores.get("config") or {}).get("proxy_bits", 4))
    table = build_table(layers, options, cfg, latency_fn, proxy_bits)
    other_bytes = 4 * max(0, int((scores.get("model") or {}).get("params") or 0) - table.params)

    constraints = []
    if budget is not None:
        k = budget_constraint(table, budget, remainder_ms, other_bytes)
        if smallest_feasible(table, k) > k.limit:
            raise BudgetError(infeasible_message(table, budget, k, remainder_ms, other_bytes))
        constraints.append(k)
    if cfg.min_speedup is not None:
        k = speedup_constraint(table, cfg.min_speedup, remainder_ms)
        if smallest_feasible(table, k) > k.limit:
            fp_step = float(table.fp_latency.sum()) + remainder_ms
            best = fp_step / (smallest_feasible(table, k) + remainder_ms)
            raise BudgetError(f"--min-speedup {cfg.min_speedup:g} is infeasible: the fastest plan of these options is "
                              f"{math.floor(best * 100) / 100:g}x per step; lower --min-speedup or allow lower --bits / --act-bits")
        constraints.append(k)

    joint = None
    step_list = None
    if cfg.latency_budget is not None:
        entries = step_entries(cfg, timesteps)
        entry, sol, rows = solve_joint(table, cfg, entries, constraints, remainder_ms, ui)
        step_list = entry.timesteps
        totals = summarize(table, sol, remainder_ms, other_bytes)
        joint = {"steps": entry.steps, "drift": entry.drift, "quant_error": totals["error"],
                 "quant_weight": cfg.quant_weight,
                 "combined_error": (entry.drift or 0.0) + cfg.quant_weight * totals["error"],
                 "latency_budget_ms": cfg.latency_budget, "total_latency_ms": entry.steps * totals["latency_ms"],
                 "candidates": rows}
    else:
        sol = solve(table, constraints, cfg.method, cfg.time_limit, ui)
        if sol is None:
            raise BudgetError(f"budget {budget} cannot be met together with the other constraints; raise it")
        if timesteps is not None:          # no joint choice: the plan carries the pruned subset as is
            step_list = list(timesteps["timesteps"])
    if sol.relaxed:
        ui.warn(f"the budget forces {sol.relaxed} protected layer(s) below {cfg.protect_bits} bits")

    totals = summarize(table, sol, remainder_ms, other_bytes)
    totals["latency_source"] = latency_source if latency_fn is not None else None
    totals["predicted_speedup"] = predicted_speedup(table, sol, remainder_ms)
    totals["remainder_source"] = remainder_source if latency_fn is not None else None
    comparison = {}
    if cfg.method == "milp" and cfg.latency_budget is None:
        alt = solve(table, constraints, "cdf", cfg.time_limit)
        if alt is not None:
            comparison["cdf"] = {k: summarize(table, alt, remainder_ms, other_bytes)[k] for k in ("avg_bits", "error", "latency_ms")}
            comparison["cdf"]["protected_relaxed"] = alt.relaxed
    plan = {
        "schema": PLAN_SCHEMA,
        "model": scores.get("model"),
        "scores_sha256": None,
        "layers": plan_layers(table, sol),
        "totals": totals,
        "budget": {"kind": budget.kind, "value": budget.value} if budget else None,
        "min_speedup": cfg.min_speedup,
        "solver": {"method": sol.method, "status": sol.status, "gap": sol.gap, "protected_relaxed": sol.relaxed},
        "options": {"bits": sorted(set(cfg.bits)), "act_bits": sorted(set(cfg.act_bits)), "act_mode": cfg.act_mode,
                    "group_size": cfg.group_size, "protect": list(cfg.protect), "protect_bits": cfg.protect_bits},
        "error_model": table.error_model,
        "conventions": {"avg_bits": "storage bits (weights, fp32 scales, fp32 bias; 16 = kept at fp32) / parameters of the scored layers",
                        "bytes": "scored layers only; other_bytes = remaining parameters at fp32",
                        "latency_ms": "one denoising step, batch 1: chosen layer latencies + non-GEMM remainder",
                        "size_mb": "1 MB = 1e6 bytes"},
        "comparison": comparison,
        "timesteps": step_list,
        "joint": joint,
    }
    pareto = pareto_front(table, cfg, budget, constraints, remainder_ms, other_bytes, timesteps, plan) if cfg.pareto else None
    return plan, pareto


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def needs_latency(cfg: AllocateConfig) -> bool:
    return (cfg.latency_budget is not None or cfg.min_speedup is not None
            or (cfg.budget is not None and parse_budget(cfg.budget).kind == "latency-ms"))


def run_allocate(ctx, cfg: AllocateConfig, *, scores_path: str | Path | None = None,
                 timesteps_path: str | Path | None = None, latency_fn: Callable[[Layer, Option], float] | None = None):
    """Write WORKDIR/plan.json (+ pareto.json and figures/pareto.png with cfg.pareto). Returns a
    StageResult (value: the plan).

    `latency_fn(layer, option) → ms` replaces the measured cost table (tests); then the remainder is
    cfg.remainder_ms or 0. The model timed for the remainder is the context's (default: the scored one).
    """
    from diffpro_cli.artifacts import atomic_write_json, input_record, read_json
    from diffpro_cli.stages.context import StageResult

    ui = ctx.ui
    workdir = ctx.workdir
    scores_path = Path(scores_path) if scores_path is not None else workdir / "scores.json"
    scores = read_json(scores_path, SCORES_SCHEMA)
    timesteps = None
    if cfg.steps == "auto" and timesteps_path is None:
        timesteps_path = workdir / "timesteps.json"
    if timesteps_path is not None:
        timesteps = read_json(timesteps_path, TIMESTEPS_SCHEMA)
    # validate every option before measuring anything
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method}: use milp or cdf")
    if cfg.latency_source not in LATENCY_SOURCES:
        raise UsageError(f"--latency-source {cfg.latency_source}: use measured or analytic")
    if cfg.budget:
        parse_budget(cfg.budget)
    if cfg.min_speedup is not None and not (math.isfinite(cfg.min_speedup) and cfg.min_speedup > 0):
        raise UsageError(f"--min-speedup {cfg.min_speedup}: must be a positive ratio against fp32, e.g. 1.5")
    make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    from diffpro_cli.models.base import ROLES

    unknown = [r for r in cfg.protect if r not in ROLES]
    if unknown:
        raise UsageError(f"--protect {','.join(unknown)}: unknown role; use a comma list of {','.join(ROLES)} or none")
    layers = load_layers(scores, scores_path)
    error_model(layers, cfg.error_model)
    if cfg.steps is not None and cfg.latency_budget is None:
        raise UsageError("--steps chooses step counts for the joint plan; add --latency-budget MS (total per image) or drop --steps")
    if timesteps is not None:
        t_spec, s_spec = (timesteps.get("model") or {}).get("spec"), (scores.get("model") or {}).get("spec")
        if t_spec and s_spec and t_spec != s_spec:
            ui.warn(f"{timesteps_path} was pruned for {t_spec} but the scores are for {s_spec}")
    if cfg.latency_budget is not None:
        step_entries(cfg, timesteps)
    if cfg.budget and parse_budget(cfg.budget).kind != "latency-ms":   # size budgets: fail before timing anything
        budget = parse_budget(cfg.budget)
        table = build_table(layers, make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size), cfg, None)
        other_bytes = 4 * max(0, int((scores.get("model") or {}).get("params") or 0) - table.params)
        k = budget_constraint(table, budget, 0.0, other_bytes)
        if smallest_feasible(table, k) > k.limit:
            raise BudgetError(infeasible_message(table, budget, k, 0.0, other_bytes))

    inputs = {"scores": input_record(scores_path)}
    if timesteps_path is not None:
        inputs["timesteps"] = input_record(timesteps_path)
    out = workdir / "plan.json"
    outputs = {"plan": out}
    if cfg.pareto:
        outputs["pareto"] = workdir / "pareto.json"
        outputs["pareto_figure"] = workdir / "figures" / "pareto.png"
    holder = {}

    def compute():
        fn, remainder, rsource, lsource = latency_fn, cfg.remainder_ms or 0.0, "given", "injected"
        if fn is None:
            cache = CostTable(workdir / "cost_table.json", ui)
            fn, lsource = measured_latency_fn(cache, cfg), cfg.latency_source
            if cfg.latency_source == "measured" and _kernels() is None:
                if needs_latency(cfg):
                    raise InputError("latency: the integer kernels (diffpro_cli.quant.layers) are not installed yet; "
                                     "pass --latency-source analytic for a labelled estimate")
                ui.warn("integer kernels not installed: plan latency not predicted (totals.latency_ms = null)")
                fn, lsource = None, None
            if fn is not None:
                ui.info(f"allocate: cost table ({lsource}) in {cache.path}")
                if cfg.remainder_ms is None:
                    if not ctx.model_spec:     # `diffpro allocate` without --model: the scored model
                        ctx.model_spec = (scores.get("model") or {}).get("spec", "")
                    spec = ctx.model_spec
                    remainder, rsource = measure_remainder_ms(ctx.load, spec, load_layers(scores, scores_path),
                                                              fn, cache, cfg.repeats, ui)
            try:
                plan, pareto = allocate_plan(scores, cfg, latency_fn=fn, remainder_ms=remainder, remainder_source=rsource,
                                             latency_source=lsource, timesteps=timesteps, scores_path=scores_path, ui=ui)
            finally:
                cache.save()
        else:
            plan, pareto = allocate_plan(scores, cfg, latency_fn=fn, remainder_ms=remainder, remainder_source=rsource,
                                         latency_source=lsource, timesteps=timesteps, scores_path=scores_path, ui=ui)
        plan["scores_sha256"] = inputs["scores"]["sha256"]
        if pareto is not None:
            from diffpro_cli.plots import plot_pareto

            atomic_write_json(outputs["pareto"], pareto)
            plot_pareto(pareto, outputs["pareto_figure"])
        atomic_write_json(out, plan)
        holder["plan"] = plan

    config = {**cfg.as_dict(), "latency_injected": latency_fn is not None}
    outcome = ctx.run_stage("allocate", inputs, config, outputs, compute)
    plan = holder.get("plan") or read_json(out, PLAN_SCHEMA)
    return StageResult(outcome, plan)
