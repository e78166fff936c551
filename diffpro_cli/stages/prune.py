"""Budgeted timestep selection guided by teacher-student drift (docs/planning.md explains every choice).

1. The teacher (full-precision model, deterministic DDIM on the reference schedule: all training steps
   by default) samples a seeded calibration batch; we record its state x_t and its noise prediction
   eps_t at every candidate step, and its final sample.
2. Local drift: for every pair of candidates a > b, one DDIM update from the teacher's (x_a, eps_a) to
   the noise level of b, compared with the teacher's own x_b (mean squared error). The teacher already
   computed eps_a, so the whole matrix costs no model call.
3. Search: the kept subset is a path top → … → tail → end through the candidate grid. Dynamic
   programming finds the path with exactly K nodes and the least summed local drift; a greedy
   remover is offered too. The start (the highest timestep, where sampling begins from pure noise) and
   the protected tail (the last T steps of the uniform schedule of the same size) are always kept.
4. Verification: each proposed subset — dp, greedy and the uniform subset itself (the candidates
   contain it) — is run end to end as a student (DDIM from the same initial noise) and its
   drift to the teacher is measured; the subset with the least measured drift is kept, so the result
   is never worse than uniform on the calibration batch. The uniform (DDIM-spaced) subset's drift is
   written as `uniform_drift`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel
from diffpro_cli.sampling import SamplerConfig, check_guidance, default_labels, sample, uniform_timesteps

SCHEMA = "diffpro.timesteps/1"
SEARCHES = ("best", "dp", "greedy")
METRICS = ("final", "trajectory")


@dataclass
class PruneConfig:
    steps: int | None = None            # K, the number of kept timesteps
    fraction: float | None = None       # or K = round(fraction × training steps)
    protect_tail: int | None = None     # T; None → max(1, round(0.1 K))
    reference_steps: int | None = None  # teacher schedule size; None → every training step
    candidates: int | None = None       # candidate grid size; None → min(reference, max(100, 2 × largest K))
    search: str = "best"                # best (dp + greedy + uniform, keep least measured drift) | dp | greedy
    metric: str = "final"               # final: MSE of final samples; trajectory: mean MSE over kept steps and final
    n: int = 16                         # calibration samples
    batch: int = 16
    seed: int = 0
    cfg_scale: float = 1.0
    clip_x0: bool | None = None         # clip predicted x0 to [-1, 1] in teacher and student (see sampler_config); None: the model's default
    sweep: list[int] = field(default_factory=list)  # extra step counts, for the joint plan (allocate --steps auto)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Budget and grids
# ---------------------------------------------------------------------------------------------


def resolve_steps(num_train: int, steps: int | None, fraction: float | None) -> int:
    """K from --steps or --fraction (default fraction 0.5, the paper's "50% fewer timesteps")."""
    if steps is not None and fraction is not None:
        raise UsageError("--steps and --fraction both given; pass only one of them")
    if steps is None:
        fraction = 0.5 if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise UsageError(f"--fraction {fraction}: must be in (0, 1], e.g. 0.5 keeps half of the steps")
        steps = max(1, round(fraction * num_train))
        if steps < 2:   # name the option the user gave, not a --steps they never passed
            raise UsageError(f"--fraction {fraction}: keeps {steps} of the {num_train} training steps; keep at least 2 "
                             f"(e.g. --fraction {2 / num_train:.3g}) or pass --steps")
    if not 2 <= steps <= num_train:
        raise UsageError(f"--steps {steps}: must be between 2 and {num_train} (the training schedule)")
    return steps


def default_tail(steps: int) -> int:
    return max(1, round(0.1 * steps))


def candidate_grid(reference: list[int], size: int) -> list[int]:
    """`size` steps of the reference schedule, evenly spaced by index, always keeping both ends."""
    idx = np.unique(np.round(np.linspace(0, len(reference) - 1, size)).astype(int))
    return [reference[i] for i in idx]


def snap(steps: list[int], reference: list[int]) -> list[int]:
    """Each step moved to the nearest step of the reference schedule (identity when the reference is full)."""
    ref = np.array(reference)
    return sorted({int(ref[np.abs(ref - t).argmin()]) for t in steps})


def protected_tail(num_train: int, reference: list[int], steps: int, tail: int) -> list[int]:
    """The last `tail` (lowest-noise) steps of the standard uniform (DDIM) schedule with `steps` steps."""
    return snap(uniform_timesteps(num_train, steps), reference)[:tail] if tail else []


def candidates_for(all_cands: list[int], tail: list[int]) -> list[int]:
    """The candidates one selection may use: everything above the protected tail, then the tail itself
    (so the tail's steps are the lowest candidates and the last kept steps)."""
    top = max(tail) if tail else -1
    return sorted(set(t for t in all_cands if t > top) | set(tail))


# ---------------------------------------------------------------------------------------------
# Teacher, local drift, search
# ---------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    x: dict[int, torch.Tensor]      # state x_t (before the update at t) at recorded steps
    eps: dict[int, torch.Tensor]    # the noise prediction at t
    final: torch.Tensor             # the final sample (model space, not decoded)
    reference: list[int]


def _recorder(keep: set[int]):
    store: dict[int, list[torch.Tensor]] = {}
    eps_store: dict[int, list[torch.Tensor]] = {}

    def on_step(t, x, eps):
        if t in keep:
            store.setdefault(t, []).append(x.to("cpu", copy=True))    # the drift algebra runs on the CPU
            eps_store.setdefault(t, []).append(eps.to("cpu", copy=True))

    def collect():
        return ({t: torch.cat(v) for t, v in store.items()}, {t: torch.cat(v) for t, v in eps_store.items()})

    return on_step, collect


def sampler_config(cfg: PruneConfig) -> SamplerConfig:
    """Deterministic DDIM, with x0 clipping like the sampler that `bench` and `sample` run (on by default).
    None follows the model (pixel space clips, VAE latents do not). The sampler's clipped DDIM uses the eps implied by the clipped x0, so students converge to the
    teacher as steps are added. (DDIM that clips x0 but keeps the raw eps, diffusers' default, adds a
    jump √ᾱ·(clip(x0) − x0) at every step: measured on builtin:dit-mnist, MSE 0.66 at 10 steps and
    still 0.40 at 250, so drift would not measure the schedule.)"""
    return SamplerConfig(method="ddim", eta=0.0, cfg_scale=cfg.cfg_scale, clip_x0=cfg.clip_x0)


def run_teacher(model: DiffusionModel, reference: list[int], record: set[int], cfg: PruneConfig,
                labels, advance=lambda k: None) -> Teacher:
    on_step, collect = _recorder(record)
    final = sample(model, cfg.n, reference, sampler_config(cfg), labels=labels, seed=cfg.seed,
                   batch_size=cfg.batch, advance=advance, on_step=on_step, decode=False)
    x, eps = collect()
    return Teacher(x=x, eps=eps, final=final, reference=reference)


def local_drift_matrix(teacher: Teacher, cands_desc: list[int], acp, clip_x0: bool = False) -> np.ndarray:
    """cost[i, j] for candidates in descending order (i < j: from the higher to the lower timestep).

    `acp`: the model's ᾱ (epsilon teachers), or the DiffusionModel itself (any prediction type: its
    coefficients x_t = a·x0 + s·ε; a flow teacher's recorded outputs are velocities).

    cost[i, j] = mean((DDIM(x_a, eps_a: ᾱ_a → ᾱ_b) − x_b)²) with a = cands_desc[i], b = cands_desc[j];
    the extra last column is the jump from a to the end (ᾱ = 1) compared with the teacher's final sample.
    Entries with i ≥ j are +inf. Computed with Gram matrices in float64:
    ‖√ᾱ_b u + √(1−ᾱ_b) e − w‖² expands into norms and dot products of u (clipped x0), e (eps), w (x_b).
    """
    C = len(cands_desc)
    X = torch.stack([teacher.x[t].reshape(-1) for t in cands_desc]).double()
    E = torch.stack([teacher.eps[t].reshape(-1) for t in cands_desc]).double()
    if isinstance(acp, DiffusionModel):   # any prediction type: x_t = a·x0 + s·ε; flow teachers record the velocity
        from diffpro_cli.sampling import split_prediction

        ca, cs = acp.coefficients()
        a_, s_ = ca[cands_desc][:, None], cs[cands_desc][:, None]
        U, E = split_prediction(acp.is_flow, a_, s_, X, E)
        if clip_x0:
            U = U.clamp(-1, 1)
            E = (X - a_ * U) / s_
        one = torch.ones(1, dtype=torch.float64)
        al, be = torch.cat([a_[:, 0], one]), torch.cat([s_[:, 0], 0 * one])   # coefficients of each target (end: x0)
    else:
        a = torch.tensor([float(acp[t]) for t in cands_desc], dtype=torch.float64)
        U = (X - (1 - a).sqrt()[:, None] * E) / a.sqrt()[:, None]
        if clip_x0:   # the sampler's DDIM: clipped x0 and the eps it implies
            U = U.clamp(-1, 1)
            E = (X - a.sqrt()[:, None] * U) / (1 - a).sqrt()[:, None]
        ab = torch.cat([a, torch.ones(1, dtype=torch.float64)])             # ᾱ of each target (end: 1)
        al, be = ab.sqrt(), (1 - ab).clamp_min(0).sqrt()
    W = torch.cat([X, teacher.final.reshape(1, -1).double()])          # targets: x_b, then the final sample
    uu, ee, ue = (U * U).sum(1), (E * E).sum(1), (U * E).sum(1)
    ww = (W * W).sum(1)
    uw, ew = U @ W.T, E @ W.T
    sq = (al ** 2 * uu[:, None] + be ** 2 * ee[:, None] + ww[None, :] + 2 * (al * be)[None, :] * ue[:, None]
          - 2 * al[None, :] * uw - 2 * be[None, :] * ew)
    cost = (sq.clamp_min(0) / X.shape[1]).numpy()
    mask = np.triu(np.ones((C, C + 1), dtype=bool), k=1)
    return np.where(mask, cost, np.inf)


def allowed_edges(C: int, tail: int) -> np.ndarray:
    """allowed[i, j]: the path may go from node i to node j (index C is the end) without skipping a tail node."""
    i = np.arange(C)[:, None]
    j = np.arange(C + 1)[None, :]
    return (i < j) & ((j <= C - tail) | (j == i + 1))


def select_dp(cost: np.ndarray, steps: int, tail: int) -> tuple[list[int], float]:
    """Exact minimum-sum path 0 → … → end with `steps` real nodes that keeps the last `tail` nodes.

    f[j] after m rounds = least cost of a path from node 0 to node j through m nodes.
    Returns (node indices, summed local drift).
    """
    C = cost.shape[0]
    c = np.where(allowed_edges(C, tail), cost, np.inf)
    f = np.full(C, np.inf)
    f[0] = 0.0
    back = []
    for _ in range(steps - 1):
        total = f[:, None] + c[:, :C]
        arg = np.argmin(total, axis=0)
        back.append(arg)
        f = total[arg, np.arange(C)]
    ends = f + c[:, C]
    j = int(np.argmin(ends))
    best = float(ends[j])
    if not math.isfinite(best):
        raise UsageError(f"no subset of {steps} steps fits the candidate grid with this tail; raise --candidates or lower --protect-tail")
    path = [j]
    for arg in reversed(back):
        j = int(arg[j])
        path.append(j)
    return path[::-1], best


def select_greedy(cost: np.ndarray, steps: int, tail: int) -> tuple[list[int], float]:
    """Start from every candidate; repeatedly drop the free node whose removal adds the least local drift."""
    C = cost.shape[0]
    kept = list(range(C))
    while len(kept) > steps:
        best_k, best_delta = None, np.inf
        for k in range(1, len(kept)):
            node = kept[k]
            if node >= C - tail:          # tail nodes (and everything after) are protected
                break
            prev, nxt = kept[k - 1], kept[k + 1] if k + 1 < len(kept) else C
            delta = cost[prev, nxt] - cost[prev, node] - cost[node, nxt]
            if delta < best_delta:
                best_k, best_delta = k, delta
        if best_k is None:
            break
        kept.pop(best_k)
    return kept, path_cost(cost, kept)


def path_cost(cost: np.ndarray, nodes: list[int]) -> float:
    C = cost.shape[0]
    hops = list(zip(nodes, nodes[1:] + [C]))
    return float(sum(cost[i, j] for i, j in hops))


# ---------------------------------------------------------------------------------------------
# End-to-end student drift
# ---------------------------------------------------------------------------------------------


def student_drift(model: DiffusionModel, subset: list[int], teacher: Teacher, cfg: PruneConfig, labels,
                  advance=lambda k: None) -> dict:
    """Run the student on `subset` from the teacher's initial noise; MSE to the teacher.

    final: mean squared difference of the final samples. curve: [t, MSE of x_t] at every kept step
    the teacher recorded. trajectory: mean of the curve's values and the final MSE.
    """
    on_step, collect = _recorder(set(subset))
    out = sample(model, cfg.n, subset, sampler_config(cfg), labels=labels, seed=cfg.seed,
                 batch_size=cfg.batch, advance=advance, on_step=on_step, decode=False)
    xs, _ = collect()
    per_sample = ((out - teacher.final) ** 2).flatten(1).mean(1)
    final = float(per_sample.mean())
    curve = [[t, float(((xs[t] - teacher.x[t]) ** 2).mean())] for t in subset if t in teacher.x]
    values = [v for _, v in curve] + [final]
    return {"final": final, "trajectory": float(np.mean(values)), "curve": curve,
            "per_sample_final": [float(v) for v in per_sample]}


def paired_comparison(selected: list[float], uniform: list[float], seed: int, resamples: int = 2000) -> dict:
    """Drift-selected vs uniform steps on the same seeds and labels, sample by sample (final MSE to the
    teacher): mean of (uniform - selected) (> 0: the selection is better), its seeded bootstrap 95%
    interval, wins/losses/ties and the two-sided sign-test p-value (scipy's binomtest)."""
    from scipy.stats import binomtest

    d = np.asarray(uniform, dtype=np.float64) - np.asarray(selected, dtype=np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)   # seeds are 0..2**63-1 (stages.context.check_seed)
    boot = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1) if n > 1 else np.repeat(d.mean(), 2)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
    return {"metric": "final MSE to the teacher, per sample", "n": n, "mean_uniform_minus_selected": float(d.mean()),
            "ci95": [lo, hi], "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_test_p": p,
            "bootstrap": {"resamples": resamples, "seed": seed},
            "significant": bool(lo > 0 or hi < 0)}


# ---------------------------------------------------------------------------------------------
# The selector
# ---------------------------------------------------------------------------------------------


def _budget_text(cfg: PruneConfig, K: int) -> str:
    """The budget as the user gave it (--steps, --fraction or the default fraction), for error messages."""
    if cfg.steps is not None:
        return f"--steps {K}"
    return f"--fraction {cfg.fraction} ({K} steps)" if cfg.fraction is not None else f"the default --fraction 0.5 ({K} steps)"


def validate_config(cfg: PruneConfig, num_train: int) -> None:
    """Every option checked against the model's schedule (one `error:` line each), e.g. by `run` before any stage."""
    _check(cfg, num_train)


def _check(cfg: PruneConfig, num_train: int) -> tuple[int, int, list[int], list[int]]:
    """Validate options; returns K, T, the reference schedule and the candidate grid (increasing)."""
    if cfg.search not in SEARCHES:
        raise UsageError(f"--search {cfg.search}: unknown; use one of {', '.join(SEARCHES)}")
    if cfg.metric not in METRICS:
        raise UsageError(f"--metric {cfg.metric}: unknown; use final or trajectory")
    if cfg.n < 1 or cfg.batch < 1:
        raise UsageError("--n and --batch must be at least 1")
    check_guidance(cfg.cfg_scale)
    K = resolve_steps(num_train, cfg.steps, cfg.fraction)
    T = default_tail(K) if cfg.protect_tail is None else cfg.protect_tail
    if not 0 <= T <= K - 1:
        raise UsageError(f"--protect-tail {T}: must be between 0 and steps - 1 = {K - 1} (the start step is always kept too)")
    R = num_train if cfg.reference_steps is None else cfg.reference_steps
    if not 2 <= R <= num_train:
        raise UsageError(f"--reference-steps {R}: must be between 2 and {num_train}")
    reference = uniform_timesteps(num_train, R)
    k_max = max([K] + list(cfg.sweep))
    if cfg.candidates is None and K > len(reference):   # the default grid is the reference: name what the user set
        raise UsageError(f"{_budget_text(cfg, K)}: more than the {len(reference)} steps of the teacher's reference "
                         f"schedule; raise --reference-steps to at least {K} or keep fewer steps")
    C = min(len(reference), max(100, 2 * k_max)) if cfg.candidates is None else cfg.candidates
    if not K <= C <= len(reference):
        raise UsageError(f"--candidates {C}: must be between --steps ({K}) and --reference-steps ({len(reference)}); raise --reference-steps")
    for k in cfg.sweep:
        if not 2 <= k <= C:
            raise UsageError(f"--sweep {k}: each step count must be between 2 and the candidate count {C}")
    return K, T, reference, candidate_grid(reference, C)


def select_timesteps(model: DiffusionModel, cfg: PruneConfig, ui: UI = QUIET_UI) -> dict:
    """The timesteps.json payload (without writing it)."""
    N = model.num_train_timesteps
    K, T, reference, grid = _check(cfg, N)
    sizes = sorted(set([K] + list(cfg.sweep)))
    tails = {k: T if k == K else (default_tail(k) if cfg.protect_tail is None else min(T, k - 1)) for k in sizes}
    uniforms = {k: uniform_timesteps(N, k) for k in sizes}
    # one candidate set for every size: the grid plus each uniform subset (snapped onto the reference),
    # so the uniform subset is itself a path the search can fall back to
    cands = sorted(set(grid).union(*(snap(u, reference) for u in uniforms.values())))
    cands_desc = cands[::-1]
    labels = default_labels(model, cfg.n)
    sampler = sampler_config(cfg).for_model(model)

    if model.untrained:
        ui.warn(f"{model.spec} is UNTRAINED (seeded random weights): the drift numbers describe a random network")
    ui.info(f"prune: teacher DDIM on {len(reference)} steps for {cfg.n} calibration samples")
    with ui.progress("teacher", total=cfg.n * len(reference)) as advance:
        teacher = run_teacher(model, reference, set(cands), cfg, labels, advance)
    if not torch.isfinite(teacher.final).all():   # else every drift is NaN and the search blames the grid
        raise InputError(f"{model.spec}: the teacher's samples are not finite (NaN or inf), so no drift can be measured; "
                         "check the model's weights (does `diffpro sample` give finite samples?)")
    cost = local_drift_matrix(teacher, cands_desc, model, clip_x0=sampler.clip_x0)

    results = []
    for k in sizes:
        tail = protected_tail(N, reference, k, tails[k])
        sub = candidates_for(cands, tail)[::-1]
        idx = [cands_desc.index(t) for t in sub]
        sub_cost = cost[np.ix_(idx, idx + [len(cands)])]          # the end column stays last
        results.append(_select_one(model, cfg, teacher, sub_cost, sub, k, len(tail), uniforms[k], labels, ui))
    main = next(r for r in results if r["steps"] == K)
    payload = {
        "schema": SCHEMA,
        "model": {"spec": model.spec, "sha256": model.sha256, "untrained": model.untrained},
        "num_train_timesteps": N,
        "timesteps": main["timesteps"],
        "protect_tail": T,
        "protected": main["protected"],
        "budget": {"steps": K, "fraction": cfg.fraction},
        "seed": cfg.seed,
        "drift": main["drift"],
        "uniform_drift": main["uniform_drift"],
        "uniform_timesteps": main["uniform_timesteps"],
        "local_drift": main["local_drift"],
        "metric": cfg.metric,
        "search": cfg.search,
        "selected_by": main["selected_by"],
        "alternatives": main["alternatives"],
        "drift_curve": main["drift_curve"],
        "paired_vs_uniform": main["paired_vs_uniform"],
        "teacher": {"sampler": "ddim", "eta": 0.0, "reference_steps": len(reference), "cfg_scale": cfg.cfg_scale,
                    "clip_x0": sampler.clip_x0, "n": cfg.n,
                    "labels": None if labels is None else ("i % num_classes" if isinstance(labels, torch.Tensor) else "i % M of the conditioning set")},
        # which schedule the integer timesteps index (flow: σ_t·N is the network's timestep)
        "schedule": {"prediction_type": model.prediction_type,
                     **({"type": "flow-matching sigmas", "shift": model.flow_shift,
                         "sigmas": [float(model.sigmas()[t]) for t in main["timesteps"]]} if model.is_flow else {"type": "alphas_cumprod"})},
        "candidates": {"count": len(cands), "grid": len(grid), "first": cands[0], "last": cands[-1]},
        "units": "mean squared error per element of the model-space sample (not decoded)",
        "sweep": [{k: r[k] for k in ("steps", "protect_tail", "timesteps", "drift", "uniform_drift", "local_drift")}
                  for r in results],
    }
    return payload


def _select_one(model, cfg, teacher, cost, cands_desc, K, T, uniform, labels, ui) -> dict:
    """Propose subsets of size K (dp, greedy, uniform), measure each end to end, keep the best."""
    C = len(cands_desc)
    proposals = {}
    if cfg.search in ("best", "dp"):
        proposals["dp"] = select_dp(cost, K, T)[0]
    if cfg.search in ("best", "greedy"):
        proposals["greedy"] = select_greedy(cost, K, T)[0]
    on_grid = snap(uniform, cands_desc)                  # the uniform subset (exact when the reference is full)
    if cfg.search == "best" and len(on_grid) == K:
        proposals["uniform"] = [cands_desc.index(t) for t in reversed(on_grid)]
    measured = {}
    with ui.progress(f"students K={K}", total=cfg.n * K * (len(proposals) + 1)) as advance:
        for name, nodes in proposals.items():
            subset = sorted(cands_desc[i] for i in nodes)
            key = tuple(subset)
            if key not in measured:
                measured[key] = student_drift(model, subset, teacher, cfg, labels, advance)
        uni = student_drift(model, uniform, teacher, cfg, labels, advance)
    alternatives = []
    for name, nodes in proposals.items():
        subset = sorted(cands_desc[i] for i in nodes)
        m = measured[tuple(subset)]
        alternatives.append({"name": name, "drift": m[cfg.metric], "final_mse": m["final"],
                             "local_drift": path_cost(cost, nodes), "timesteps": subset})
    best = min(alternatives, key=lambda a: a["drift"])
    chosen = measured[tuple(best["timesteps"])]
    ui.info(f"prune: K={K} drift {best['drift']:.4g} ({best['name']}) vs uniform {uni[cfg.metric]:.4g}")
    return {
        "steps": K, "protect_tail": T, "timesteps": best["timesteps"], "protected": sorted(cands_desc[C - T:]),
        "drift": best["drift"], "uniform_drift": uni[cfg.metric], "uniform_timesteps": list(uniform),
        "local_drift": best["local_drift"], "selected_by": best["name"],
        "alternatives": [{k: v for k, v in a.items() if k != "timesteps"} for a in alternatives],
        "drift_curve": {"selected": chosen["curve"], "uniform": uni["curve"],
                        "selected_final": chosen["final"], "uniform_final": uni["final"]},
        "paired_vs_uniform": paired_comparison(chosen["per_sample_final"], uni["per_sample_final"], cfg.seed),
    }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run_prune(ctx, cfg: PruneConfig, *, figure: bool = True):
    """Write WORKDIR/timesteps.json (and figures/drift.png) unless up to date. Returns a StageResult
    (value: the timesteps payload)."""
    from diffpro_cli.artifacts import atomic_write_json, read_json

    model = ctx.model()
    workdir = ctx.workdir
    _check(cfg, model.num_train_timesteps)       # bad options fail before anything runs
    out = workdir / "timesteps.json"
    fig = workdir / "figures" / "drift.png"
    outputs = {"timesteps": out}
    if figure:
        outputs["figure"] = fig
    def compute():
        payload = select_timesteps(model, cfg, ctx.ui)
        if figure:
            from diffpro_cli.plots import plot_drift

            plot_drift(payload, fig)
        atomic_write_json(out, payload)
        return payload

    # --batch only groups the seeded samples (each has its own generator): changing it is not a new result;
    # the model is its input record (its sha256), not the spec as typed (./dit and /abs/dit are one model)
    config = {**{k: v for k, v in cfg.as_dict().items() if k != "batch"}, "figure": figure}
    return ctx.run_stage("prune", {"model": ctx.model_record(model)}, config, outputs, compute, seed=cfg.seed,
                         reread=lambda: read_json(out, SCHEMA))
