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

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import BudgetError, InputError, UsageError
from diffpro_cli.planning.costs import attach_kernels, measure_cost_table, read_cost_table, table_latency_fn, world_table
from diffpro_cli.planning.fingerprint import FINGERPRINT_VERSION, check_fingerprint, fingerprint_id, machine_fingerprint
from diffpro_cli.planning.costs_compiled import is_compiled
from diffpro_cli.planning.error_model import error_model, plan_pair_bound
from diffpro_cli.planning.joint import float_step_cut_check, pareto_front, solve_joint, step_entries
from diffpro_cli.planning.options import (DEFAULT_PROTECT, FLOAT_ACT_ROLES, METHODS, Layer, Option, load_layers, make_options,
                                          canonical_budgets, parse_budgets)
from diffpro_cli.stages.allocate_dtype import SILENT_UI, WORLDS, plan_per_world
from diffpro_cli.planning.solvers import (Constraint, budget_constraint, build_table, infeasible_message, plan_layers,
                                          predicted_speedup, smallest_feasible, solve, speedup_constraint, summarize)

PLAN_SCHEMA = "diffpro.plan/1"
SCORES_SCHEMA = "diffpro.scores/1"
TIMESTEPS_SCHEMA = "diffpro.timesteps/1"
LATENCY_SOURCES = ("measured", "analytic")
CACHE_METRICS = ("inception", "mse")

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class AllocateConfig:
    budget: str | None = None            # "avg-bits=5.0" | "size-mb=3" | "latency-ms=2.5" (per step and image) | "latency=0.4"
    bits: list[int] = field(default_factory=lambda: [4, 8, 16])
    # execution paths: 8 = integer kernel with DAQ (dynamic int8 activations), 16 = float compute from the
    # stored low-bit weights; without a latency budget each layer runs the faster of the two on this machine
    act_bits: list[int] = field(default_factory=lambda: [8, 16])
    act_mode: str = "dynamic"
    group_size: int | None = None
    method: str = "milp"
    protect: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECT))
    protect_bits: int = 8
    float_act: list[str] = field(default_factory=lambda: list(FLOAT_ACT_ROLES))   # roles computed on float activations
    latency_budget: float | None = None  # joint plan: total ms per image over all steps
    min_speedup: float | None = None     # per-step latency ≤ the fastest float step's / this (measured kernels, same run)
    steps: str | int | None = None       # joint plan: "auto" (the artifact's sweep) or a step count
    quant_weight: float = 1.0            # joint plan: units of quantization error per unit of drift
    batch: int = 8                       # images per call the cost table is timed at (bench's --latency-batch)
    cost_table: str | None = None        # an explicit cost table (another machine's: planned for as given, with a warning)
    int_margin: float = 0.05             # without a latency budget an integer path must be this much faster than float
    full_steps: int = 50                 # budget latency=F: F × the fp32 latency of this many steps (bench's reference)
    latency_source: str = "measured"     # measured (real kernels) | analytic (labelled estimate)
    repeats: int = 15                    # cost-table timing rounds (round-robin over every cell, minimum kept)
    remainder_ms: float | None = None    # non-GEMM time per step; None → measured from the model
    pareto: bool = False
    time_limit: float = 60.0
    error_model: str = "auto"            # auto | measured | proxy | score | cdf (see error_model())
    cache: bool = False                  # bits × steps × cache: also try more steps with reused computation (docs/caching.md)
    cache_n: int = 8                     # calibration samples of that comparison (teacher: float on full_steps)
    cache_objective: str = "latency"     # latency: faster at no more drift than the plan; drift: less drift at its latency
    cache_tolerance: float = 0.0         # latency objective: drift allowed over the plan's, as a fraction of it
    cache_metric: str = "inception"      # drift of that comparison: inception (paired FID features of decoded samples) | mse
    compile: bool = False                # price and plan for torch.compile'd execution (planning/costs_compiled.py)
    check: bool = True                   # measure the plan against the float step cut at its latency (allocate_check.py)
    check_n: int = 16                    # calibration samples of that check (paired, seeded)
    check_metric: str = "inception"      # its distance to fp32: inception (paired FID features) | mse (final samples)
    check_rounding: str = "nearest"      # the plan's weights rounded as quantize will (run: [quantize] rounding)

    def as_dict(self) -> dict:
        return asdict(self)



def validate_config(cfg: AllocateConfig) -> None:
    """Every option checked once, before anything is read or timed (one `error:` line each)."""
    from diffpro_cli.models.base import ROLES

    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method}: use milp or cdf")
    if cfg.latency_source not in LATENCY_SOURCES:
        raise UsageError(f"--latency-source {cfg.latency_source}: use measured or analytic")
    budgets = parse_budgets(cfg.budget)
    if not budgets and cfg.latency_budget is None:
        raise UsageError("no budget: pass --budget avg-bits=5.0 (or size-mb=… / latency-ms=… / latency=0.4) or --latency-budget MS with --timesteps")
    if cfg.latency_budget is not None and cfg.latency_budget <= 0:
        raise UsageError(f"--latency-budget {cfg.latency_budget}: must be a positive number of milliseconds per image")
    if cfg.min_speedup is not None and not (math.isfinite(cfg.min_speedup) and cfg.min_speedup > 0):
        raise UsageError(f"--min-speedup {cfg.min_speedup}: must be a positive ratio against fp32, e.g. 1.5")
    from diffpro_cli.planning.cache_plan import OBJECTIVES

    if cfg.cache_objective not in OBJECTIVES:
        raise UsageError(f"--cache-objective {cfg.cache_objective}: use latency (faster at no more drift) or drift (less drift at the same latency)")
    if cfg.cache_metric not in CACHE_METRICS:
        raise UsageError(f"--cache-metric {cfg.cache_metric}: use inception (paired FID features of the decoded samples) or mse (final samples)")
    if not (math.isfinite(cfg.cache_tolerance) and 0 <= cfg.cache_tolerance < 1):
        raise UsageError(f"cache_tolerance {cfg.cache_tolerance}: must be in [0, 1), e.g. 0.05 allows 5% more drift than the plan")
    if cfg.check_metric not in CACHE_METRICS:
        raise UsageError(f"--check-metric {cfg.check_metric}: use inception (paired FID features of the decoded samples) or mse (final samples)")
    if cfg.check_rounding not in ("nearest", "gptq"):
        raise UsageError(f"--check-rounding {cfg.check_rounding}: use nearest or gptq (quantize's --rounding)")
    if cfg.check_n < 2:
        raise UsageError(f"--check-n {cfg.check_n}: the paired check needs at least 2 calibration samples")
    if cfg.cache_n < 1:
        raise UsageError(f"cache_n {cfg.cache_n}: must be at least 1 calibration sample")
    if not 0 <= cfg.int_margin < 1:
        raise UsageError(f"int_margin {cfg.int_margin}: must be in [0, 1)")
    if not (math.isfinite(cfg.quant_weight) and cfg.quant_weight >= 0):
        raise UsageError(f"--quant-weight {cfg.quant_weight}: must be a non-negative weight of the quantization error, e.g. 1.0")
    if cfg.remainder_ms is not None and not (math.isfinite(cfg.remainder_ms) and cfg.remainder_ms >= 0):
        raise UsageError(f"--remainder-ms {cfg.remainder_ms}: must be a non-negative time per step (omit it to measure)")
    make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    if not 2 <= cfg.protect_bits <= 16:   # above 16 no option meets it: "the budget forces ..." under any budget
        raise UsageError(f"--protect-bits {cfg.protect_bits}: a weight-bit floor from 2 to 16 (16 = protected roles stay fp32)")
    unknown = [r for r in cfg.protect if r not in ROLES]
    if unknown:
        raise UsageError(f"--protect {','.join(unknown)}: unknown role; use a comma list of {','.join(ROLES)} or none")
    unknown = [r for r in cfg.float_act if r not in ROLES]
    if unknown:
        raise UsageError(f"--float-act {','.join(unknown)}: unknown role; use a comma list of {','.join(ROLES)} or none")
    if cfg.steps is not None and cfg.latency_budget is None and not any(b.kind == "latency" for b in budgets):
        raise UsageError("--steps chooses step counts for the joint plan; add --budget latency=F or --latency-budget MS, or drop --steps")


def trades_latency_of(cfg: AllocateConfig) -> bool:
    """Whether the plan trades latency against error (a latency budget, --latency-budget or --min-speedup)."""
    return cfg.latency_budget is not None or cfg.min_speedup is not None or any(
        b.kind in ("latency", "latency-ms") for b in parse_budgets(cfg.budget))


def checkpoint_other_bytes(scores: dict, table) -> int:
    """Bytes of the checkpoint outside the planned layers, as profiled (buffers, schedule, header);
    scores from before it was recorded: the unplanned parameters at fp32."""
    model = scores.get("model") or {}
    if model.get("checkpoint_other_bytes") is not None:
        return int(model["checkpoint_other_bytes"])
    return 4 * max(0, int(model.get("params") or 0) - table.params)


def world_float_step_ms(view: dict, layers, remainder_ms: float | None) -> float | None:
    """A cost-table world's all-float step per image (its layers' float column + its remainder), as the
    solver prices it; None where a layer's float time is missing."""
    try:
        gemm = sum(float(view["layers"][layer.name]["ms"]["fp32"]) for layer in layers)
    except (KeyError, TypeError, ValueError):
        return None
    return gemm + (float(view["remainder_ms"]) if remainder_ms is None else float(remainder_ms))


def allocate_plan(scores: dict, cfg: AllocateConfig, *, latency_fn: Callable[[Layer, Option], float] | None = None,
                  remainder_ms: float = 0.0, remainder_source: str = "given", latency_source: str = "given",
                  timesteps: dict | None = None, scores_path: str | Path = "scores.json", ui: UI = QUIET_UI,
                  reference_float_ms: float | None = None) -> tuple[dict, dict | None]:
    """The plan.json payload (and the Pareto payload with cfg.pareto). Pure: writes nothing.
    `reference_float_ms`: the fastest float step on this machine (any compute dtype), which --min-speedup
    is measured against; None: this table's float step."""
    validate_config(cfg)
    budgets = parse_budgets(cfg.budget)
    fraction = next((b.value for b in budgets if b.kind == "latency"), None)
    budgets = [b for b in budgets if b.kind != "latency"]
    budget = budgets[0] if budgets else None
    layers = load_layers(scores, scores_path)
    options = make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    proxy_bits = int((scores.get("config") or {}).get("proxy_bits", 4))
    trades_latency = trades_latency_of(cfg)
    # no latency budget to trade against: each stored width runs its faster path on this machine
    table = build_table(layers, options, cfg, latency_fn, proxy_bits,
                        fastest_path_margin=None if trades_latency else cfg.int_margin)
    other_bytes = checkpoint_other_bytes(scores, table)

    constraints = []
    for b in budgets:
        k = budget_constraint(table, b, remainder_ms, other_bytes)
        if smallest_feasible(table, k) > k.limit:
            raise BudgetError(infeasible_message(table, b, k, remainder_ms, other_bytes))
        constraints.append(k)
    if fraction is not None:
        full_ms = full_schedule_ms(table, remainder_ms, cfg.full_steps)
        ms = fraction * full_ms
        if cfg.latency_budget is not None:
            ms = min(ms, cfg.latency_budget)
        cfg = dataclasses.replace(cfg, latency_budget=ms, steps=cfg.steps or "auto")
    if cfg.min_speedup is not None:
        k = speedup_constraint(table, cfg.min_speedup, remainder_ms, reference_float_ms)
        if smallest_feasible(table, k) > k.limit:
            fp_step = float(table.fp_latency.sum()) + remainder_ms if reference_float_ms is None else reference_float_ms
            best = fp_step / (smallest_feasible(table, k) + remainder_ms)
            raise BudgetError(f"--min-speedup {cfg.min_speedup:g} is infeasible: the fastest plan of these options is "
                              f"{math.floor(best * 100) / 100:g}x the fastest float step ({fp_step:.3g} ms); lower "
                              "--min-speedup or allow lower --bits / --act-bits")
        constraints.append(k)

    joint = None
    step_list = None
    if cfg.latency_budget is not None:
        entries = step_entries(cfg, timesteps)
        try:
            entry, sol, rows = solve_joint(table, cfg, entries, constraints, remainder_ms, ui)
        except BudgetError:
            if fraction is None:
                raise
            cheapest = min(e.steps for e in entries) * (smallest_feasible(table, Constraint("", table.latency, 0)) + remainder_ms)
            need = math.ceil(cheapest / full_ms * 1000) / 1000
            raise BudgetError(f"--budget latency={fraction:g} ({cfg.latency_budget:.4g} ms per image) is infeasible: the smallest "
                              f"feasible is latency={need:g} ({cheapest:.4g} ms: {min(e.steps for e in entries)} steps at the "
                              f"cheapest bits); raise it or prune to fewer steps (prune --sweep)") from None
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
    check = float_step_cut_check(table, sol, remainder_ms, step_list, timesteps, joint)
    if check is not None:
        ui.info(f"allocate: {check['verdict']}")
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
        **({"pair_bound": pb} if (pb := plan_pair_bound(scores.get("pair_bound"), table.layers, table.options, sol.choice)) else {}),
        "conventions": {"avg_bits": "storage bits (weights, fp32 scales, fp32 bias; 16 = kept at fp32) / parameters of the scored layers",
                        "bytes": "scored layers only; other_bytes = the rest of the checkpoint as profiled (buffers, schedule, header estimate)",
                        "latency_ms": "one denoising step per image at the cost table's batch: chosen layer latencies + non-GEMM remainder",
                        "act_bits": "execution path: 8 = integer kernel with dynamic int8 activations, 16 = float compute from the stored weights",
                        "size_mb": "1 MB = 1e6 bytes"},
        "comparison": comparison,
        "execution": {"rule": "solver trades latency (a latency budget was given)" if trades_latency
                      else f"fastest measured path per stored width (integer only when ≥ {cfg.int_margin:.0%} faster than float)",
                      "integer_layers": sum(1 for e in plan_layers(table, sol).values() if e["weight_bits"] < 16 and e["act_bits"] < 16),
                      "float_from_int_layers": sum(1 for e in plan_layers(table, sol).values() if e["weight_bits"] < 16 and e["act_bits"] >= 16),
                      "fp32_layers": sum(1 for e in plan_layers(table, sol).values() if e["weight_bits"] >= 16)},
        "baseline_check": check,
        "timesteps": step_list,
        "joint": joint,
    }
    pareto = pareto_front(table, cfg, budget, constraints, remainder_ms, other_bytes, timesteps, plan) if cfg.pareto else None
    return plan, pareto


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def full_schedule_ms(table, remainder_ms: float, full_steps: int) -> float:
    """fp32 latency per image over the full schedule (what latency=F is a fraction of)."""
    if table.fp_latency is None or np.isnan(table.fp_latency).any():
        raise UsageError("--budget latency=F needs the measured cost table (drop --latency-source analytic only if it was measured)")
    return full_steps * (float(table.fp_latency.sum()) + remainder_ms)


def run_allocate(ctx, cfg: AllocateConfig, *, scores_path: str | Path | None = None,
                 timesteps_path: str | Path | None = None, latency_fn: Callable[[Layer, Option], float] | None = None):
    """Write WORKDIR/plan.json (+ pareto.json and figures/pareto.png with cfg.pareto). Returns a
    StageResult (value: the plan).

    `latency_fn(layer, option) → ms` replaces the measured cost table (tests); then the remainder is
    cfg.remainder_ms or 0. The model timed for the remainder is the context's (default: the scored one).
    """
    from diffpro_cli.artifacts import atomic_write_json, input_record, read_json

    ui = ctx.ui
    workdir = ctx.workdir
    validate_config(cfg)          # every option before reading or measuring anything
    scores_path = Path(scores_path) if scores_path is not None else workdir / "scores.json"
    scores = read_json(scores_path, SCORES_SCHEMA)
    timesteps = None
    joint = cfg.steps == "auto" or any(b.kind == "latency" for b in parse_budgets(cfg.budget)) \
        or (cfg.latency_budget is not None and cfg.steps is None)   # --latency-budget alone: as latency=F does
    if joint and timesteps_path is None and (cfg.steps == "auto" or (workdir / "timesteps.json").exists()):
        timesteps_path = workdir / "timesteps.json"   # the step counts the joint plan chooses from
    if timesteps_path is not None:
        timesteps = read_json(timesteps_path, TIMESTEPS_SCHEMA)
    layers = load_layers(scores, scores_path)
    error_model(layers, cfg.error_model)
    if timesteps is not None:
        t_spec, s_spec = _spec_of(timesteps), _spec_of(scores)
        if t_spec and s_spec and t_spec != s_spec:
            ui.warn(f"{timesteps_path} was pruned for {t_spec} but the scores are for {s_spec}")
    if cfg.latency_budget is not None or joint or timesteps is not None:   # a bad --steps or timesteps.json fails
        step_entries(cfg, timesteps, path=timesteps_path)   # before the cost table is timed; steps None reads as "auto"
    size_budgets = [b for b in parse_budgets(cfg.budget) if b.kind in ("avg-bits", "size-mb")]
    if size_budgets:   # size budgets: fail before timing anything
        table = build_table(layers, make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size), cfg, None)
        other_bytes = checkpoint_other_bytes(scores, table)
        for budget in size_budgets:
            k = budget_constraint(table, budget, 0.0, other_bytes)
            if smallest_feasible(table, k) > k.limit:
                raise BudgetError(infeasible_message(table, budget, k, 0.0, other_bytes))

    inputs = {"scores": input_record(scores_path)}
    if timesteps_path is not None:
        inputs["timesteps"] = input_record(timesteps_path)
    if cfg.cost_table and Path(cfg.cost_table).is_file():   # its timings price the plan: a new table is not up to date
        inputs["cost_table"] = input_record(cfg.cost_table)
    out = workdir / "plan.json"
    outputs = {"plan": out}
    if cfg.pareto:
        outputs["pareto"] = workdir / "pareto.json"
        outputs["pareto_figure"] = workdir / "figures" / "pareto.png"

    def compute():
        fingerprint, doc = None, None
        if latency_fn is None:
            if not ctx.model_spec:     # `diffpro allocate` without --model: the scored model
                ctx.model_spec = _spec_of(scores) or ""
            doc = obtain_cost_table(ctx, cfg, layers)
            fingerprint = doc["fingerprint"]

        worlds = plan_worlds(doc, cfg, ui)
        # each world's all-float step, whether or not its plan turns out feasible: --min-speedup and the
        # baseline check are against the fastest float this machine runs
        float_steps = {} if doc is None else {w: world_float_step_ms(world_table(doc, w), layers, cfg.remainder_ms) for w in worlds}
        fastest_float = min((v for v in float_steps.values() if v), default=None)

        def solve_world(world: str, steps: int | None = None):
            fn, remainder, rsource, lsource = latency_fn, cfg.remainder_ms or 0.0, "given", "injected"
            if doc is not None:
                view = world_table(doc, world)
                fn, lsource = table_latency_fn(view, analytic=cfg.latency_source == "analytic"), cfg.latency_source
                if cfg.remainder_ms is None:
                    remainder, rsource = float(view["remainder_ms"]), "measured"
            return allocate_plan(scores, cfg if steps is None else dataclasses.replace(cfg, steps=str(steps)), latency_fn=fn,
                                 remainder_ms=remainder, remainder_source=rsource,
                                 latency_source=lsource, timesteps=timesteps, scores_path=scores_path, ui=SILENT_UI,
                                 reference_float_ms=fastest_float)

        def finish(p: dict) -> dict:
            if doc is not None:   # each integer layer runs the kernel its cost-table cell was fastest with
                attach_kernels(p["layers"], world_table(doc, p.get("compute_dtype", "float32")))
            return p

        plan, pareto = plan_per_world(solve_world, worlds, trades_latency_of(cfg), ui, float_steps)
        plan = finish(plan)
        if cfg.check and doc is not None:   # measured in one unit against the float step cut (allocate_check.py)
            from diffpro_cli.stages.allocate_check import step_cut_check

            plan = step_cut_check(ctx, cfg, plan, timesteps, finish=finish, plan_for_steps=lambda k: plan_per_world(
                lambda w: solve_world(w, k), worlds, trades_latency_of(cfg), SILENT_UI, float_steps)[0])
            if pareto is not None and plan.get("joint"):
                pareto["chosen"] = {"total_latency_ms": plan["joint"]["total_latency_ms"], "error": plan["joint"]["combined_error"]}
        if plan["solver"]["protected_relaxed"]:
            ui.warn(f"the budget forces {plan['solver']['protected_relaxed']} protected layer(s) below {cfg.protect_bits} bits")
        if plan.get("baseline_check"):
            ui.info(f"allocate: {plan['baseline_check']['verdict']}")
        plan["cost_table"] = None if fingerprint is None else {
            "path": str(Path(cfg.cost_table) if cfg.cost_table else workdir / "cost_table.json"),
            "fingerprint": fingerprint, "batch": cfg.batch}
        plan["scores_sha256"] = inputs["scores"]["sha256"]
        if cfg.cache:
            if doc is None:
                raise UsageError("allocate cache = true prices reused blocks with the measured cost table; drop the injected latencies")
            from diffpro_cli.stages.allocate_cache import joint_cache_section

            plan["cache"] = joint_cache_section(ctx, cfg, plan, doc, timesteps)
        if pareto is not None:
            from diffpro_cli.plots import plot_pareto

            atomic_write_json(outputs["pareto"], pareto)
            plot_pareto(pareto, outputs["pareto_figure"])
        atomic_write_json(out, plan)
        return plan

    if latency_fn is None and cfg.cost_table is None:
        outputs["cost_table"] = cost_table_path(ctx)
    config = {**cfg.as_dict(), "budget": canonical_budgets(cfg.budget), "latency_injected": latency_fn is not None}
    if latency_fn is None:
        # a plan is priced for one machine: the same inputs on another machine are not up to date
        config["machine"] = fingerprint_id(machine_fingerprint(ctx.device))
    return ctx.run_stage("allocate", inputs, config, outputs, compute, reread=lambda: read_json(out, PLAN_SCHEMA))


def plan_worlds(doc: dict | None, cfg: AllocateConfig, ui) -> list[str]:
    """The cost-table worlds the plan is solved in: the eager ones (float32, and bfloat16 where native),
    or with `compile` the compiled ones only (the plan is then for compiled execution, and the float it
    must beat is compiled float). An analytic estimate has only the float32 world."""
    if doc is None or cfg.latency_source == "analytic":
        if cfg.compile:
            ui.warn("allocate --compile: an analytic or injected latency has no compiled timings; planning for eager execution")
        return ["float32"]
    have = list(doc.get("worlds") or {})
    if cfg.compile:
        compiled = [w for w in have if is_compiled(w)]
        if compiled:
            return compiled
        why = doc.get("compiled_unavailable") or "the cost table has no compiled timings (measure it with allocate --compile)"
        ui.warn(f"allocate --compile: {why}; planning for eager execution")
    return ["float32"] + [w for w in have if w in WORLDS]


def cost_table_path(ctx) -> Path:
    """WORKDIR/cost_table.json for the CPU; one table per GPU run device (cost_table-cuda.json, ...)."""
    return ctx.workdir / ("cost_table.json" if ctx.device == "cpu" else f"cost_table-{ctx.device.replace(':', '')}.json")


def obtain_cost_table(ctx, cfg: AllocateConfig, layers: list[Layer]) -> dict:
    """The cost table this plan is priced with: `cfg.cost_table` as given (another machine's is used with a
    warning), else WORKDIR/cost_table.json when it was measured here for this model and batch (missing
    columns are timed and added), else measured now on the context's model."""
    from diffpro_cli.artifacts import atomic_write_json

    options = make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    if cfg.cost_table:
        path = Path(cfg.cost_table)
        if not path.exists():
            raise InputError(f"--cost-table {path}: no such file; measure one with `diffpro allocate` on the target machine")
        doc = read_cost_table(path)
        missing = [l.name for l in layers if l.name not in doc["layers"]]
        if missing:   # not "delete it or pass --force" (costs.py): that is the user's target-machine table
            raise InputError(f"--cost-table {path}: has no layer {missing[0]} (timed for {_spec_of(doc) or 'another model'}); "
                             "pass a table measured for the scored model, or drop --cost-table to time one here")
        check_fingerprint(doc, path, explicit=True, ui=ctx.ui, device=ctx.device)
        return doc
    path = cost_table_path(ctx)
    previous = None
    if path.exists() and not ctx.force:
        previous = read_cost_table(path)
        if (previous.get("fingerprint") or {}).get("version", 0) < FINGERPRINT_VERSION:   # an older diffpro's table: time it again
            ctx.ui.info(f"allocate: {path} was measured by an older diffpro (its fingerprint lacks the bf16 flags or "
                        "the allocator setting); re-measuring")
            previous = None
        else:
            check_fingerprint(previous, path, explicit=False, ui=ctx.ui, device=ctx.device)
        model = ctx.model()
        timed_for = (previous or {}).get("model")
        if previous is not None and (previous.get("batch") != cfg.batch or not isinstance(timed_for, dict)
                                     or timed_for.get("sha256") != model.sha256 or timed_for.get("spec") != model.spec):
            ctx.ui.info(f"allocate: {path} was timed for another model or batch; re-measuring")
            previous = None
    model = ctx.model()
    ctx.ui.info(f"allocate: cost table at batch {cfg.batch} on this machine ({ctx.device}) -> {path}")
    doc = measure_cost_table(model, options, cfg.batch, cfg.repeats, ctx.ui, previous=previous, compiled=cfg.compile)
    missing = [l.name for l in layers if l.name not in doc["layers"]]
    if missing:
        raise InputError(f"scores.json names layers the model does not run ({', '.join(missing[:3])}...); "
                         f"re-run `diffpro score` for {model.spec}")
    atomic_write_json(path, doc)
    return doc


def _spec_of(doc: dict) -> str | None:
    """The model spec an artifact records (None where its 'model' is missing or not an object)."""
    record = doc.get("model")
    return record.get("spec") if isinstance(record, dict) else None
