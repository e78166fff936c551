"""Figures for the planning stages: the drift curve of `prune` and the Pareto front of `allocate`.

Agg backend (no display); every PNG is written atomically from an in-memory buffer.
"""

from __future__ import annotations

import io
from pathlib import Path


def _figure(ncols: int = 1, width: float = 6.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.0), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str | Path) -> Path:
    from diffpro_cli.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _positive(values):
    return [max(v, 1e-12) for v in values]


def plot_drift(payload: dict, path: str | Path) -> Path:
    """Left: student-vs-teacher MSE of x_t along the trajectory (selected vs uniform subset).
    Right (when the artifact has a sweep of step counts): final drift against the number of steps."""
    sweep = payload.get("sweep") or []
    plt, fig, axes = _figure(2 if len(sweep) > 1 else 1)
    ax = axes[0]
    curve = payload["drift_curve"]
    for key, label, style in (("selected", f"selected ({payload['selected_by']})", "o-"), ("uniform", "uniform (DDIM)", "s--")):
        pts = [p for p in curve.get(key) or [] if p[1] > 0]   # the start is identical (same noise): no point on a log axis
        if pts:
            ax.plot([p[0] for p in pts], _positive([p[1] for p in pts]), style, ms=3, label=label)
    for t in payload.get("protected", []):
        ax.axvline(t, color="grey", alpha=0.15, lw=2)
    ax.set_xlabel("timestep t (protected tail shaded)")
    ax.set_ylabel("MSE(student x_t, teacher x_t)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    title = f"K={len(payload['timesteps'])}: drift {payload['drift']:.3g} vs uniform {payload['uniform_drift']:.3g}"
    if payload.get("model", {}).get("untrained"):
        title += " (UNTRAINED model)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if len(sweep) > 1:
        ax = axes[1]
        ks = [s["steps"] for s in sweep]
        ax.plot(ks, _positive([s["drift"] for s in sweep]), "o-", label="selected")
        ax.plot(ks, _positive([s["uniform_drift"] for s in sweep]), "s--", label="uniform (DDIM)")
        ax.set_xlabel("kept steps")
        ax.set_ylabel(f"drift ({payload.get('metric', 'final')})")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_pareto(pareto: dict, path: str | Path) -> Path:
    """Predicted error against the budget axis (avg bits or latency), MILP front and rule-based points."""
    plt, fig, axes = _figure(1)
    ax = axes[0]
    x_key = pareto["x"]
    for method, style in (("milp", "o-"), ("cdf", "s--"), ("joint", "o-")):
        pts = sorted((p for p in pareto["points"] if p["method"] == method and p["error"] > 0), key=lambda p: p[x_key])
        if pts:
            ax.plot([p[x_key] for p in pts], _positive([p["error"] for p in pts]), style, ms=4, label=method)
    chosen = pareto.get("chosen")
    if chosen and chosen["error"] > 0:
        ax.plot([chosen[x_key]], [chosen["error"]], "r*", ms=12, label="plan")
    ax.set_xlabel(pareto.get("x_label", x_key))
    ax.set_ylabel("predicted error (log; zero-error plans not drawn)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(pareto.get("title", "allocation Pareto front"), fontsize=9)
    return _save(plt, fig, path)
