"""Choosing what to reuse across steps (docs/caching.md): a static per-(unit, step) schedule under a
compute budget, checked end to end against the dynamic first-block policy at the same compute.

1. Calibration: the uncached model samples a seeded batch on the given timesteps (deterministic DDIM,
   x0 clipping as the sampler does: the prune stage's teacher, on the student's own schedule, so the
   drift measures caching alone). While it runs, for every unit u and every pair of steps p < s at most
   `max_gap` apart, D_u[p, s] = mean((r_u(s) − r_u(p))²): the error of reusing at step s the residual
   computed at step p, teacher-forced (no extra model call).
2. Per unit, a dynamic programme over paths of computed steps (the first and the protected last steps
   always computed, no gap over `max_gap`) gives the least summed D for every count m of computed steps.
3. Per-unit gain: errors of different blocks reach the final sample with different gains, so each
   unit is probed once end to end (reused at every other free step, the others computed) and
   gain_u = measured final drift / its summed D. Predicted drift of a schedule = Σ_u gain_u · D-sum_u.
4. Budget: the MILP (scipy's HiGHS) picks one count per unit, minimising the predicted drift with
   Σ_u cost_u · m_u ≤ budget, cost_u = 1 (fraction of block evaluations) or the block's measured
   latency (latency fraction).
5. Aligned proposal: the whole stack reused together at the same steps (output = input of block 0 +
   the stack's residual of the last computed step); the computed steps chosen by the same dynamic
   programme on the stack residual's change S[p, s], with the most computed steps the budget allows.
6. Verification (as prune's `--search best`): the per-unit schedule, the aligned one, the uniform
   interval and the first-block threshold policy (bisection: the smallest threshold whose measured
   cost fits the budget) are each run end to end on the calibration batch; the least measured drift
   is written. The float step cut with the same share of block evaluations is measured as a reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from diffpro_cli.cache import CacheSchedule, FirstBlockCache, cached, num_cache_units, unit_kind, unit_modules
from diffpro_cli.console import QUIET_UI, UI, native_stdout_silenced
from diffpro_cli.errors import BudgetError, UsageError

SCHEMA = "diffpro.cache_plan/1"
BUDGETS = ("compute", "latency")


# ---------------------------------------------------------------------------------------------
# Pure solvers (tested on hand-made tables)
# ---------------------------------------------------------------------------------------------


def forced_steps(K: int, protect_tail: int) -> np.ndarray:
    f = np.zeros(K, dtype=bool)
    f[0] = True
    if protect_tail:
        f[K - protect_tail:] = True
    return f


def unit_curve(D: np.ndarray, forced: np.ndarray, max_gap: int, weight: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[list[int] | None]]:
    """Least cost of reusing, for every count m of computed steps (index m, inf where impossible),
    and the computed steps achieving it. D[p, s] (p < s): cost of step s reusing step p's residual.
    A path computes step 0 and every forced step; consecutive computed steps are at most max_gap
    apart (the steps after the last computed one, up to the end, count as a gap to step K)."""
    K = len(forced)
    w = np.ones(K) if weight is None else weight
    # seg[p, q]: cost of computing p and q (or the end q = K) and reusing p at every step between
    seg = np.full((K, K + 1), np.inf)
    for p in range(K):
        acc = 0.0
        for q in range(p + 1, min(K, p + max_gap) + 1):
            seg[p, q] = acc
            if q < K:
                if forced[q]:
                    break                       # cannot jump over a forced step
                acc += w[q] * D[p, q]
    f = np.full((K, K + 1), np.inf)             # f[j, c]: j computed as the c-th computed step
    back = np.full((K, K + 1), -1, dtype=int)
    f[0, 1] = 0.0
    for q in range(1, K):
        for p in range(max(0, q - max_gap), q):
            if not np.isfinite(seg[p, q]):
                continue
            cand = f[p, :-1] + seg[p, q]
            better = cand < f[q, 1:]
            f[q, 1:][better] = cand[better]
            back[q, 1:][better] = p
    best = np.full(K + 1, np.inf)
    paths: list[list[int] | None] = [None] * (K + 1)
    for m in range(1, K + 1):
        for p in range(K):
            if np.isfinite(seg[p, K]) and f[p, m] + seg[p, K] < best[m]:
                best[m] = f[p, m] + seg[p, K]
                path, j, c = [], p, m
                while j >= 0:
                    path.append(j)
                    j, c = back[j, c], c - 1
                paths[m] = path[::-1]
    return best, paths


def choose_counts(curves: Sequence[np.ndarray], unit_cost: Sequence[float], budget: float) -> tuple[list[int], float]:
    """One count m_u per unit minimising Σ curves[u][m_u] with Σ unit_cost[u] · m_u ≤ budget (exact MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    cells = [(u, m) for u, c in enumerate(curves) for m in range(len(c)) if np.isfinite(c[m])]
    cheapest = sum(unit_cost[u] * min(m for v, m in cells if v == u) for u in range(len(curves)))
    if cheapest > budget * (1 + 1e-12):
        raise BudgetError(f"cache budget {budget:.4g} is below the cheapest schedule ({cheapest:.4g}: first and "
                          "protected steps computed, no gap over max_gap); raise the budget or max_gap")
    err = np.array([curves[u][m] for u, m in cells])
    scale = err.max() if err.size and err.max() > 0 else 1.0
    onehot = np.zeros((len(curves), len(cells)))
    cost = np.zeros(len(cells))
    for j, (u, m) in enumerate(cells):
        onehot[u, j] = 1
        cost[j] = unit_cost[u] * m
    limit = budget
    for _ in range(5):
        with native_stdout_silenced():
            res = milp(err / scale, integrality=np.ones(len(cells)), bounds=Bounds(0, 1),
                       constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(cost[None, :], -np.inf, limit)],
                       options={"mip_rel_gap": 1e-9})
        if res.x is None:
            raise BudgetError(f"cache budget {budget:.4g}: the solver found no schedule ({res.message}); raise the budget")
        pick = [cells[j] for j in np.flatnonzero(res.x > 0.5)]
        counts = [0] * len(curves)
        for u, m in pick:
            counts[u] = m
        used = sum(unit_cost[u] * m for u, m in enumerate(counts))
        if used <= budget * (1 + 1e-12):
            return counts, float(sum(curves[u][m] for u, m in enumerate(counts)))
        limit -= used - budget                 # solver tolerance broke the row: tighten and re-solve
    raise BudgetError(f"cache budget {budget:.4g}: no schedule within it after re-solving; raise the budget")


def interval_schedule(K: int, n_units: int, interval: int, protect_tail: int) -> list[frozenset[int]]:
    """Every unit computed every `interval` steps (and at the first and protected steps)."""
    forced = forced_steps(K, protect_tail)
    return [frozenset(range(n_units)) if forced[i] or i % interval == 0 else frozenset() for i in range(K)]


# ---------------------------------------------------------------------------------------------
# Calibration on the real model
# ---------------------------------------------------------------------------------------------


@dataclass
class CachePlanConfig:
    budget: str = "compute"         # compute: fraction of block evaluations; latency: fraction of the blocks' measured time
    fraction: float = 0.6
    max_gap: int = 3                # at most max_gap - 1 reused steps in a row per unit
    protect_tail: int | None = None  # None → max(1, round(0.1 K)), as prune
    n: int = 16                     # calibration samples, labels i % classes, noise seeded per sample
    batch: int = 16
    seed: int = 0
    cfg_scale: float = 1.0
    clip_x0: bool | None = None         # None: the model's default (samplers resolve it)
    latency_batch: int = 8          # per-block latency timed at bench's batch
    repeats: int = 7
    proposals: tuple = ("per-unit", "aligned", "interval", "fbcache")   # measured end to end (fbcache: DiTs only)
    step_cut: bool = True           # also measure the float step cut at the same share (a reference)

    def as_dict(self) -> dict:
        return asdict(self)


def _sampler(cfg: CachePlanConfig):
    from diffpro_cli.sampling import SamplerConfig

    return SamplerConfig(method="ddim", eta=0.0, cfg_scale=cfg.cfg_scale, clip_x0=cfg.clip_x0)


def _final(model, timesteps, cfg: CachePlanConfig, labels, policy=None, on_residual=None):
    from diffpro_cli.sampling import sample

    with cached(model, policy, timesteps=timesteps, on_residual=on_residual) as run:
        out = sample(model, cfg.n, timesteps, _sampler(cfg), labels=labels, seed=cfg.seed, batch_size=cfg.batch, decode=False)
    return out, run


def residual_change_tables(model, timesteps: list[int], cfg: CachePlanConfig, labels) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The uncached (teacher) final samples, D[u, p, s] = mean((r_u(s) − r_u(p))²) per unit and
    S[p, s], the same for the whole stack's residual (last block's output − first block's input),
    for 0 < s − p ≤ max_gap (inf elsewhere)."""
    K, N = len(timesteps), num_cache_units(model.net)
    sq = np.zeros((N + 1, K, K))
    cnt = np.zeros((N + 1, K, K))
    window: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    stack: dict[int, torch.Tensor] = {}

    def add(key, slot, step, res):
        w = window.setdefault(key, {})
        if step == 0:
            w.clear()
        for p, r in list(w.items()):
            if step - p > cfg.max_gap:
                del w[p]
            elif r.shape == res.shape:
                sq[slot, p, step] += float(((res - r).double() ** 2).sum())
                cnt[slot, p, step] += res.numel()
        w[step] = res

    def on_residual(step, call, unit, res):
        res = res.detach().clone()
        add((call, unit), unit, step, res)
        if unit == 0:
            stack[call] = res
        elif stack[call].shape == res.shape:
            stack[call] = stack[call] + res
        else:   # joint blocks: (image, context) flattened, the last one image only: the stack's is the image part
            w = min(stack[call].shape[1], res.shape[1])
            stack[call] = stack[call][:, :w] + res[:, :w]
        if unit == N - 1:
            add((call, -1), N, step, stack.pop(call))

    final, _ = _final(model, timesteps, cfg, labels, None, on_residual)
    D = np.where(cnt > 0, sq / np.maximum(cnt, 1), np.inf)
    return final, D[:N], D[N]


def block_latencies(model, cfg: CachePlanConfig, with_forward: bool = False):
    """ms per image of each unit's compute at cfg.latency_batch: every module of the unit (a DiT block;
    a U-Net's deep blocks) timed on its real input (one fp32 forward records the inputs:
    costs.capture_inputs), round-robin over cfg.repeats rounds, minimum kept (costs.interleaved_min_ms,
    the cost table's estimator), summed per unit. `with_forward`: also the whole forward, timed in
    the same rounds (returns (units, forward ms per image)), so a unit's share of a step is read from
    one timing session (on a shared CPU, times from different moments do not compare)."""
    from diffpro_cli.planning.costs import capture_inputs, interleaved_min_ms

    units = unit_modules(model.net)
    blocks = {f"{u}.{j}": m for u, mods in enumerate(units) for j, m in enumerate(mods)}
    n = cfg.latency_batch
    inputs, (x, t, y) = capture_inputs(model, blocks, n, cfg.seed)
    fns = {k: (lambda b=b, a=inputs[k]: b(*a[0], **a[1])) for k, b in blocks.items()}
    if with_forward:
        fns["__forward__"] = lambda: model.eps(x, t, y)
    with torch.no_grad():
        ms = interleaved_min_ms(fns, cfg.repeats, device=str(x.device))   # synchronised on a GPU
    out = [sum(ms[f"{u}.{j}"] for j in range(len(mods))) / n for u, mods in enumerate(units)]
    return (out, ms["__forward__"] / n) if with_forward else out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def plan_cache(model, timesteps: Sequence[int], cfg: CachePlanConfig = CachePlanConfig(), ui: UI = QUIET_UI,
               unit_cost: Sequence[float] | None = None) -> dict:
    """The cache plan record (cache.json payload): the chosen policy, its schedule, measured drift and
    compute fraction, with the other policies measured the same way. `unit_cost` (ms per unit, with
    budget "latency") replaces the float blocks' timing, e.g. the quantized plan's unit latencies."""
    from diffpro_cli.sampling import default_labels

    ts = sorted(int(t) for t in timesteps)
    K, N = len(ts), num_cache_units(model.net)
    dit = unit_kind(model.net) == "dit"
    T = max(1, round(0.1 * K)) if cfg.protect_tail is None else cfg.protect_tail
    if cfg.budget not in BUDGETS:
        raise UsageError(f"cache budget {cfg.budget!r}: unknown; use compute or latency")
    if not 0 < cfg.fraction <= 1:
        raise UsageError(f"cache fraction {cfg.fraction}: must be in (0, 1], e.g. 0.6 runs 60% of the block evaluations")
    if not 0 <= T <= K - 1:
        raise UsageError(f"cache protect_tail {T}: must be between 0 and steps - 1 = {K - 1}")
    if cfg.max_gap < 1:
        raise UsageError(f"cache max_gap {cfg.max_gap}: must be at least 1 (1 = never reuse)")
    labels = default_labels(model, cfg.n)
    forced = forced_steps(K, T)
    least = int(np.flatnonzero(np.isfinite(unit_curve(np.zeros((K, K)), forced, cfg.max_gap)[0]))[0])
    if least / K > cfg.fraction + 1e-12:   # fail before any model call
        raise BudgetError(f"cache fraction {cfg.fraction}: below the cheapest schedule ({least} of {K} steps computed: the "
                          f"first, {T} protected, no gap over max_gap {cfg.max_gap}); raise the fraction or max_gap")
    ui.info(f"cache: calibration ({cfg.n} samples, {K} steps, {N} blocks)")
    teacher, D, S = residual_change_tables(model, ts, cfg, labels)
    curves, paths = zip(*(unit_curve(D[u], forced, cfg.max_gap) for u in range(N)))
    lat = list(unit_cost) if unit_cost is not None else block_latencies(model, cfg)
    unit_cost = lat if cfg.budget == "latency" else [1.0] * N
    budget = cfg.fraction * K * sum(unit_cost)

    def measure(policy) -> dict:
        out, run = _final(model, ts, cfg, labels, policy)
        return {"drift": _mse(out, teacher), "compute_fraction": run.compute_fraction,
                "cost_fraction": run.weighted_fraction(unit_cost)}

    proposals: dict[str, tuple] = {}   # name → (policy, extra record)
    # per-unit schedule: each unit probed once end to end (reused at every other free step) for its gain
    gains = []
    probe = [i for i in range(1, K) if not forced[i] and i % 2 == 1]
    per_unit = "per-unit" in cfg.proposals and N > 1      # one unit (a U-Net): the aligned schedule is the same
    for u in range(N if per_unit else 0):
        computed = [frozenset(range(N)) - ({u} if i in probe else set()) for i in range(K)]
        out, _ = _final(model, ts, cfg, labels, CacheSchedule(ts, N, computed))
        dsum = sum(D[u, i - 1, i] for i in probe)
        gains.append(_mse(out, teacher) / dsum if dsum > 0 else 0.0)
    try:
        if per_unit:
            counts, predicted = choose_counts([np.asarray(c) * g for c, g in zip(curves, gains)], unit_cost, budget)
            computed = [set() for _ in range(K)]
            for u, m in enumerate(counts):
                for i in paths[u][m]:
                    computed[i].add(u)
            proposals["per-unit"] = (CacheSchedule(ts, N, computed), {"predicted_drift": predicted, "counts": counts})
    except BudgetError:
        pass
    # aligned: whole stack reused together, computed steps chosen by the stack residual's change
    s_curve, s_paths = unit_curve(S, forced, cfg.max_gap)
    m = max((m for m in range(1, K + 1) if np.isfinite(s_curve[m]) and m * sum(unit_cost) <= budget * (1 + 1e-12)), default=None)
    if m is None:
        raise BudgetError(f"cache fraction {cfg.fraction}: below the cheapest schedule (first and {T} protected steps "
                          f"computed, no gap over max_gap {cfg.max_gap}); raise the fraction or max_gap")
    if "aligned" in cfg.proposals or not proposals:
        proposals["aligned"] = (CacheSchedule(ts, N, [frozenset(range(N)) if i in s_paths[m] else frozenset()
                                                      for i in range(K)]), {"computed_steps": m})
    for k in range(2, K + 1 if "interval" in cfg.proposals else 2):   # the uniform interval with the most compute within the budget
        sched = CacheSchedule(ts, N, interval_schedule(K, N, k, T))
        if sched.compute_fraction() * K * sum(unit_cost) <= budget * (1 + 1e-12):
            proposals["interval"] = (sched, {"interval": k})
            break
    results = {name: {**measure(pol), **extra} for name, (pol, extra) in proposals.items()}
    # first-block threshold: the smallest threshold (bisection) whose measured cost fits the budget
    key = "cost_fraction"
    lo, hi, fb = 0.0, 0.25, None
    for _ in range(12 if dit and "fbcache" in cfg.proposals else 0):
        r = measure(FirstBlockCache(ts, N, hi, T))
        if r[key] <= cfg.fraction + 1e-12:
            fb = {**r, "threshold": hi}
            break
        lo, hi = hi, hi * 2
    if fb is not None:
        for _ in range(7):
            mid = (lo + hi) / 2
            r = measure(FirstBlockCache(ts, N, mid, T))
            if r[key] <= cfg.fraction + 1e-12:
                hi, fb = mid, {**r, "threshold": mid}
            else:
                lo = mid
        proposals["fbcache"] = (FirstBlockCache(ts, N, fb["threshold"], T), {})
        results["fbcache"] = fb
    winner = min(results, key=lambda k: results[k]["drift"])
    # reference, not a policy: the float step cut with the same share of block evaluations
    from diffpro_cli.sampling import sample, uniform_timesteps

    k_cut = max(1, int(cfg.fraction * K + 1e-9))
    step_cut = None
    if cfg.step_cut:
        cut = sample(model, cfg.n, uniform_timesteps(model.num_train_timesteps, k_cut), _sampler(cfg), labels=labels,
                     seed=cfg.seed, batch_size=cfg.batch, decode=False)
        step_cut = {"steps": k_cut, "drift": _mse(cut, teacher), "compute_fraction": k_cut / K}
    policy = proposals[winner][0]
    ui.info(f"cache: {winner} wins within {cfg.budget} fraction {cfg.fraction} ("
            + ", ".join(f"{k} drift {v['drift']:.3g} at {v['compute_fraction']:.3f}" for k, v in results.items()) + ")")
    return {
        "schema": SCHEMA,
        "policy": policy.policy,
        "selected_by": winner,
        "schedule": policy.as_dict(),
        "proposals": {k: p.as_dict() for k, (p, _) in proposals.items()},
        "drift": results[winner]["drift"],
        "compute_fraction": results[winner]["compute_fraction"],
        "cost_fraction": results[winner]["cost_fraction"],
        "results": results,
        "step_cut": step_cut,
        "budget": {"kind": cfg.budget, "fraction": cfg.fraction, "limit": budget, "unit_cost": unit_cost},
        "block_latency_ms": lat,
        "unit_gain": gains,
        "protect_tail": T,
        "drift_definition": "mean squared difference of final samples (model space) vs the uncached model on the same timesteps",
        "config": cfg.as_dict(),
        "timesteps": ts,
    }


def cache_plan_for(model, timesteps: Sequence[int], workdir, cfg: CachePlanConfig = CachePlanConfig(),
                   ui: UI = QUIET_UI, force: bool = False) -> tuple[dict, bool]:
    """WORKDIR/cache.json for this model and schedule: re-used when it was planned for the same model and
    timesteps, whatever config planned it (and `force` is off), else planned with `cfg` and written.
    Returns (record, planned_now)."""
    from pathlib import Path

    from diffpro_cli.artifacts import atomic_write_json, read_json

    path = Path(workdir) / "cache.json"
    want = {"model": model.sha256 or model.spec, "timesteps": sorted(int(t) for t in timesteps)}
    if path.is_file() and not force:
        rec = read_json(path, SCHEMA)
        if all(rec.get(k) == v for k, v in want.items()):
            return rec, False
    rec = plan_cache(model, timesteps, cfg, ui)
    rec["model"] = want["model"]
    atomic_write_json(path, rec)
    return rec, True


def unit_layer_names(net, names) -> list[list[str]]:
    """Per cacheable unit, which of the named layers (e.g. the plan's) run inside it."""
    inside = [{id(m) for mod in mods for m in mod.modules()} for mods in unit_modules(net)]
    modules = dict(net.named_modules())
    return [[n for n in names if n in modules and id(modules[n]) in ids] for ids in inside]


OBJECTIVES = ("latency", "drift")
SPEED_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def plan_joint_cache(model, teacher_model, base_ts: list[int], candidates: dict[int, list[int]], step_ms: float,
                     unit_ms: list[float], budget_ms: float, teacher_ts: list[int], cfg: CachePlanConfig,
                     ui: UI = QUIET_UI, objective: str = "drift", tolerance: float = 0.0,
                     distance: Callable[[torch.Tensor, torch.Tensor], float] | None = None, decode: bool = False) -> dict:
    """bits × steps × cache on `model` (the plan's quantized network, or float): the bits+steps plan on
    `base_ts` against cache schedules on K' steps (timesteps `candidates[K']`). Each is measured end to
    end against `teacher_model` on `teacher_ts` (the float model on the reference schedule).

    objective "drift": one schedule per K' at the share of the units' time that keeps K' steps within
    `budget_ms` (the plan's own predicted latency); the least drift is kept.
    objective "latency": per K' (the plan's own steps included), schedules at falling latency targets
    (SPEED_RATIOS × `budget_ms`) until one drifts more than the plan; the fastest that drifts no more
    than the plan (× 1 + `tolerance`) is kept: faster at no more drift, or no cache.
    "drift" is `distance(candidate samples, teacher samples)` (None: MSE), on decoded samples with
    `decode`; the teacher tensor is the same object in every call (a distance may cache its features)."""
    from diffpro_cli.cache import policy_from_dict
    from diffpro_cli.planning.joint import cache_fraction_for, schedule_latency_ms, select_fastest_cache, select_joint_cache

    if objective not in OBJECTIVES:
        raise UsageError(f"cache objective {objective!r}: use latency (faster at no more drift) or drift (less drift at the same latency)")
    from diffpro_cli.sampling import default_labels, sample

    labels = default_labels(model, cfg.n)
    distance = distance or _mse

    def final(m, ts, policy=None):
        with cached(m, policy, timesteps=ts):
            return sample(m, cfg.n, ts, _sampler(cfg), labels=labels, seed=cfg.seed, batch_size=cfg.batch, decode=decode)

    ui.info(f"allocate: cache vs steps, teacher = float on {len(teacher_ts)} steps ({cfg.n} samples)")
    teacher = final(teacher_model, sorted(teacher_ts))
    base = {"steps": len(base_ts), "timesteps": list(base_ts), "cache": None, "predicted_ms": len(base_ts) * step_ms,
            "drift": distance(final(model, sorted(base_ts)), teacher)}
    rows = []

    def candidate(k2: int, ts: list[int], target_ms: float, ratio: float | None) -> dict:
        frac = cache_fraction_for(step_ms, unit_ms, k2, target_ms)
        row = {"steps": k2, "timesteps": list(ts), "unit_fraction": frac, "drift": None}
        if ratio is not None:
            row["target_ratio"] = ratio
        rows.append(row)
        if not 0 < frac < 1:
            row["skipped"] = "no share of the units' time fits the budget" if frac <= 0 else "fits without a cache"
            return row
        try:
            rec = plan_cache(model, ts, dataclasses.replace(cfg, budget="latency", fraction=frac), ui, unit_cost=unit_ms)
        except BudgetError as exc:
            row["skipped"] = str(exc)
            return row
        policy = policy_from_dict(rec["schedule"])
        row.update(cache=rec["schedule"], selected_by=rec["selected_by"], compute_fraction=rec["compute_fraction"],
                   predicted_ms=schedule_latency_ms(step_ms, unit_ms, policy.computed),
                   drift=distance(final(model, ts, policy), teacher))
        ui.info(f"allocate: {k2} steps + cache ({rec['selected_by']}, compute {rec['compute_fraction']:.2f}, predicted "
                f"{row['predicted_ms'] / base['predicted_ms']:.2f}x the plan's time): drift {row['drift']:.3g} vs "
                f"{base['drift']:.3g} for {base['steps']} steps without")
        return row

    if objective == "drift":
        for k2, ts in sorted(candidates.items()):
            candidate(k2, ts, budget_ms, None)
        best = select_joint_cache(base, rows, budget_ms)
    else:
        limit = base["drift"] * (1 + tolerance)
        for k2, ts in [(len(base_ts), list(base_ts))] + sorted((k, t) for k, t in candidates.items() if k != len(base_ts)):
            for ratio in SPEED_RATIOS:   # drift grows as the target falls: stop at the first one over the plan's
                row = candidate(k2, ts, ratio * budget_ms, ratio)
                if row["drift"] is None and row["unit_fraction"] < 1 or row["drift"] is not None and row["drift"] > limit:
                    break
        best = select_fastest_cache(base, rows, tolerance)
    return {"base": base, "candidates": rows, "chosen": best, "budget_ms": budget_ms, "step_ms": step_ms,
            "unit_ms": unit_ms, "teacher_steps": len(teacher_ts), "objective": objective, "tolerance": tolerance}
