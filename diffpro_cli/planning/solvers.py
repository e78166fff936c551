"""The cost table as arrays, and the solvers: exact MILP (scipy) and the paper's CDF rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from diffpro_cli.console import QUIET_UI, UI, native_stdout_silenced
from diffpro_cli.errors import UsageError
from diffpro_cli.planning.error_model import activation_error_model, error_model, option_error
from diffpro_cli.planning.options import Budget, Layer, Option, effective_option, option_bits

@dataclass
class Table:
    layers: list[Layer]
    options: list[Option]
    bits: np.ndarray        # [L, O] int64 storage bits
    error: np.ndarray       # [L, O] predicted error
    latency: np.ndarray     # [L, O] ms, nan when not measured
    valid: np.ndarray       # [L, O] the option exists for the layer (all True since group sizes fall back per layer)
    violates: np.ndarray    # [L, O] below the protection floor of a protected layer
    error_model: str
    protect: set[str]       # protected roles
    fp_latency: np.ndarray | None = None   # [L] ms of each layer kept at fp32 (the speed-up baseline)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)


def build_table(layers: list[Layer], options: list[Option], cfg,
                latency_fn: Callable[[Layer, Option], float] | None, proxy_bits: int = 4,
                fastest_path_margin: float | None = None) -> Table:
    """One row per layer, one column per option. With measured latencies, an option the kernels cannot
    run (nan) is invalid; with `fastest_path_margin` (no latency budget to trade against), each stored
    width keeps only its faster execution path on this machine: the integer kernel when it beats float
    compute from the same stored weights by at least the margin, else float compute."""
    name, bit_error = error_model(layers, cfg.error_model, proxy_bits)
    act_name, act_error = activation_error_model(layers, name, bit_error)
    name = f"weights: {name}; activations: {act_name}"
    L, O = len(layers), len(options)
    bits = np.zeros((L, O), dtype=np.int64)
    err = np.zeros((L, O))
    lat = np.full((L, O), np.nan)
    valid = np.ones((L, O), dtype=bool)
    violates = np.zeros((L, O), dtype=bool)
    protect = set(cfg.protect)
    # float activations for these roles wherever the options offer float compute at the same stored width
    float_act = set(getattr(cfg, "float_act", ()))
    float_widths = {o.weight_bits for o in options if o.act_bits >= 16}
    for i, layer in enumerate(layers):
        for j, option in enumerate(options):
            opt = effective_option(layer, option)
            bits[i, j] = option_bits(layer, opt)
            err[i, j] = option_error(bit_error, act_error, layer, opt)
            violates[i, j] = layer.role in protect and opt.weight_bits < cfg.protect_bits
            if layer.role in float_act and opt.act_bits < 16 and opt.weight_bits in float_widths:
                valid[i, j] = False
            if latency_fn is not None:
                lat[i, j] = latency_fn(layer, opt)
    fp_latency = None
    if latency_fn is not None:
        valid &= ~np.isnan(lat)
        if fastest_path_margin is not None:
            keep_fastest_path(options, lat, valid, fastest_path_margin)
        fp = Option(16, 16, cfg.act_mode, None)
        fp_latency = np.array([latency_fn(layer, fp) for layer in layers], dtype=float)
    return Table(layers, options, bits, err, lat, valid, violates, name, protect, fp_latency)


def keep_fastest_path(options: list[Option], lat: np.ndarray, valid: np.ndarray, margin: float) -> None:
    """In place: for every (layer, stored width, group size) with both an integer and a float execution
    option, invalidate the slower one (the integer one must win by `margin`: float is more accurate)."""
    for j, opt in enumerate(options):
        if opt.full_precision or opt.act_bits >= 16:
            continue
        twin = next((k for k, o in enumerate(options) if o.act_bits >= 16 and o.weight_bits == opt.weight_bits
                     and o.group_size == opt.group_size), None)
        if twin is None:
            continue
        both = valid[:, j] & valid[:, twin]
        int_wins = lat[:, j] <= lat[:, twin] * (1.0 - margin)
        valid[both & int_wins, twin] = False
        valid[both & ~int_wins, j] = False


@dataclass
class Constraint:
    name: str            # shown in messages, e.g. "avg-bits"
    cost: np.ndarray     # [L, O]
    limit: float         # Σ chosen cost ≤ limit


@dataclass
class Solution:
    choice: list[int]    # option index per layer
    status: str
    gap: float | None
    method: str
    relaxed: int = 0     # protected layers pushed below the floor because the budget forced it


def solve_milp(error: np.ndarray, constraints: list[Constraint], allowed: np.ndarray,
               penalty: np.ndarray | None = None, time_limit: float = 60.0) -> Solution | None:
    """min Σ error·x  s.t. one option per layer, every constraint row, x binary. None when infeasible.

    Errors are scaled to max 1 for conditioning; `penalty` (added as is) makes protection soft.
    After rounding, each constraint is checked exactly; a row broken by solver tolerance is tightened
    by the excess and the problem solved again.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    L, O = error.shape
    cells = np.argwhere(allowed)                     # one binary per allowed (layer, option)
    scale = error[allowed].max() if error[allowed].max() > 0 else 1.0
    c = error[allowed] / scale + (penalty[allowed] if penalty is not None else 0.0)
    onehot = csr_matrix((np.ones(len(cells)), (cells[:, 0], np.arange(len(cells)))), shape=(L, len(cells)))
    limits = [float(k.limit) for k in constraints]
    for _ in range(5):
        rows = [LinearConstraint(onehot, 1, 1)]
        rows += [LinearConstraint(k.cost[allowed][None, :], -np.inf, lim) for k, lim in zip(constraints, limits)]
        with native_stdout_silenced():
            res = milp(c, integrality=np.ones(len(cells)), bounds=Bounds(0, 1), constraints=rows,
                       options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        if res.x is None:
            return None
        x = np.round(res.x).astype(bool)
        choice = [0] * L
        for (i, j), on in zip(cells, x):
            if on:
                choice[i] = int(j)
        excess = [chosen_total(k.cost, choice) - k.limit for k in constraints]
        if all(e <= 0 for e in excess):
            status = {0: "optimal", 1: "time limit (best found)"}.get(res.status, res.message)
            gap = getattr(res, "mip_gap", None)
            return Solution(choice, status, float(gap) if gap is not None else None, "milp")
        limits = [lim - max(e, 0) - 1e-9 * max(1.0, abs(lim)) for lim, e in zip(limits, excess)]
    return None


def chosen_total(cost: np.ndarray, choice: list[int]):
    """Σ cost[l, choice[l]] (exact Python ints for integer tables)."""
    return sum(cost[i, j].item() for i, j in enumerate(choice))


def solve_cdf(table: Table, constraints: list[Constraint], protect: bool = True) -> Solution | None:
    """The paper's rank/CDF rule: layers whose score CDF exceeds θ keep the high bits, the rest get the
    low bits (the largest / smallest quantized weight width); protected roles never go below their
    floor; θ is the smallest threshold that meets every budget. One activation width for all layers:
    the one of --act-bits whose plan predicts the least error. If no plan keeps the protection, the
    rule runs again without it."""
    quant = [j for j, o in enumerate(table.options) if not o.full_precision]
    if not quant:
        return Solution([0] * len(table.layers), "rule", None, "cdf")
    best = None
    for act in sorted({table.options[j].act_bits for j in quant}):
        sol = _cdf_threshold(table, constraints, [j for j in quant if table.options[j].act_bits == act], protect)
        if sol is not None and (best is None or chosen_total(table.error, sol.choice) < chosen_total(table.error, best.choice)):
            best = sol
    if best is None and protect:
        return solve_cdf(table, constraints, protect=False)
    return best


def _cdf_threshold(table: Table, constraints: list[Constraint], family: list[int], protect: bool) -> Solution | None:
    """The smallest θ for which 'cdf > θ → highest width of `family`, else lowest' meets every budget."""
    by_bits = {table.options[j].weight_bits: j for j in family}
    low, high = by_bits[min(by_bits)], by_bits[max(by_bits)]
    cdfs = np.array([l.cdf for l in table.layers])
    for theta in [-1.0] + sorted(set(cdfs.tolist())):
        choice = []
        for i in range(len(table.layers)):
            j = high if cdfs[i] > theta else low
            if protect and table.violates[i, j]:
                ok = [k for k in family if not table.violates[i, k] and table.valid[i, k]]
                j = min(ok, key=lambda k: table.options[k].weight_bits) if ok else j
            if not table.valid[i, j]:
                j = next(k for k in range(len(table.options)) if table.valid[i, k])
            choice.append(j)
        if all(chosen_total(k.cost, choice) <= k.limit for k in constraints):
            return Solution(choice, f"rule (theta={theta:.3g}, a{table.options[family[0]].act_bits})", None, "cdf")
    return None


def smallest_feasible(table: Table, k: Constraint) -> float:
    """Σ over layers of the cheapest valid option (protection ignored: the budget may force it)."""
    return float(sum(np.min(k.cost[i][table.valid[i]]) for i in range(len(table.layers))))


def solve(table: Table, constraints: list[Constraint], method: str, time_limit: float, ui: UI = QUIET_UI) -> Solution | None:
    """Protected layers stay at ≥ the floor when some plan allows it; otherwise the floor is relaxed for
    as few protected layers as possible (lexicographic penalty), with a warning."""
    if method == "cdf":
        sol = solve_cdf(table, constraints)
    else:
        strict = table.valid & ~table.violates
        sol = None
        if strict.any(axis=1).all():
            sol = solve_milp(table.error, constraints, strict, time_limit=time_limit)
        if sol is None:
            penalty = np.where(table.violates, float(len(table.layers) + 1), 0.0)
            sol = solve_milp(table.error, constraints, table.valid, penalty=penalty, time_limit=time_limit)
    if sol is not None:
        sol.relaxed = int(sum(table.violates[i, j] for i, j in enumerate(sol.choice)))
    return sol


# ---------------------------------------------------------------------------------------------
# Budgets → constraint rows, infeasibility messages
# ---------------------------------------------------------------------------------------------


def budget_constraint(table: Table, budget: Budget, remainder_ms: float, other_bytes: int) -> Constraint:
    if budget.kind == "avg-bits":
        return Constraint("avg-bits", table.bits, math.floor(budget.value * table.params + 1e-9))
    if budget.kind == "size-mb":
        return Constraint("size-mb", table.bits, math.floor((budget.value * 1e6 - other_bytes) * 8 + 1e-9))
    if budget.kind != "latency-ms":
        raise ValueError(f"{budget.kind} is not a per-step constraint")
    _require_latency(table, "--budget latency-ms")
    return Constraint("latency-ms", table.latency, budget.value - remainder_ms)


def speedup_constraint(table: Table, min_speedup: float, remainder_ms: float,
                       reference_ms: float | None = None) -> Constraint:
    """Per-step latency (chosen layers + remainder) ≤ the float step's latency / min_speedup: a ratio
    against a baseline measured in the same run, so one config works on any machine. `reference_ms`:
    that float step (the fastest float on this machine, whatever dtype the plan computes in); None:
    this table's all-float step. With --act-bits 8,16 this is what keeps float activations for the few
    layers where they pay."""
    _require_latency(table, "--min-speedup")
    fp_step = float(table.fp_latency.sum()) + remainder_ms if reference_ms is None else float(reference_ms)
    return Constraint("min-speedup", table.latency, fp_step / min_speedup - remainder_ms)


def predicted_speedup(table: Table, sol: "Solution", remainder_ms: float) -> float | None:
    """fp32 step latency / the plan's step latency, from the cost table (None when not measured)."""
    if table.fp_latency is None or np.isnan(table.fp_latency).any():
        return None
    lat = chosen_total(table.latency, sol.choice)
    if not math.isfinite(lat):
        return None
    return (float(table.fp_latency.sum()) + remainder_ms) / (lat + remainder_ms)


def _require_latency(table: Table, what: str) -> None:
    if np.isnan(table.latency[table.valid]).any():
        raise UsageError(f"{what} needs the latency cost table; it was not measured (see the warning above)")


def budget_value(table: Table, budget: Budget, limit: float, remainder_ms: float, other_bytes: int) -> float:
    """A constraint limit (bits or layer ms) expressed in the budget's own unit."""
    if budget.kind == "avg-bits":
        return limit / table.params
    if budget.kind == "size-mb":
        return (limit / 8 + other_bytes) / 1e6
    return limit + remainder_ms


def infeasible_message(table: Table, budget: Budget, k: Constraint, remainder_ms: float, other_bytes: int) -> str:
    low = budget_value(table, budget, smallest_feasible(table, k), remainder_ms, other_bytes)
    digits = 100 if budget.kind == "avg-bits" else 1000
    need = math.ceil(low * digits) / digits
    return (f"budget {budget} is infeasible: the smallest feasible is {budget.kind}={need:g} "
            f"(every layer at its cheapest option); raise the budget or add lower --bits")


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def summarize(table: Table, sol: Solution, remainder_ms: float, other_bytes: int) -> dict:
    total_bits = chosen_total(table.bits, sol.choice)
    has_lat = not np.isnan([table.latency[i, j] for i, j in enumerate(sol.choice)]).any()
    lat = chosen_total(table.latency, sol.choice) + remainder_ms if has_lat else None
    return {
        "avg_bits": total_bits / table.params,
        "bytes": total_bits / 8,
        "other_bytes": other_bytes,
        "latency_ms": lat,
        "error": float(chosen_total(table.error, sol.choice)),
        "params": table.params,
        "remainder_ms": remainder_ms if has_lat else None,
    }


def plan_layers(table: Table, sol: Solution) -> dict:
    out = {}
    for i, (layer, j) in enumerate(zip(table.layers, sol.choice)):
        opt = effective_option(layer, table.options[j])
        lat = table.latency[i, j]
        out[layer.name] = {
            "weight_bits": opt.weight_bits, "act_bits": opt.act_bits, "act_mode": opt.act_mode,
            "group_size": None if opt.full_precision else opt.group_size,
            "role": layer.role, "protected": layer.role in table.protect,
            "bytes": int(table.bits[i, j]) / 8, "latency_ms": None if np.isnan(lat) else float(lat),
            "error": float(table.error[i, j]),
        }
    return out

