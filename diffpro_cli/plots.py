"""Every diffpro figure, and the small helpers they are drawn with.

Figures are built with matplotlib's object API (`Figure` on an Agg canvas), never pyplot, so calling
any function here needs no backend switch and leaves no global state: it works headless from a
library, a notebook or the CLI alike. PNGs are written atomically and without timestamp metadata, so
equal inputs give equal bytes.

Helpers: `new_figure`, `save_figure`, `lines_on`, `scatter_on`, `ecdf_on`, `heatmap_on` (score's
figures and scripts use them directly). Figures: `plot_drift` (prune), `plot_pareto` (allocate),
`latency_figure`, `fid_bits_figure`, `sample_grid_figure`, `cdf_figure` (bench's report).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 4.2):
    """(figure, axes) on the Agg canvas; axes is one Axes for 1×1, else an array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as PNG atomically (no timestamp metadata, so equal inputs give equal bytes)."""
    from diffpro_cli.artifacts import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def lines_on(ax, series: Sequence[tuple], *, title: str = "", xlabel: str = "", ylabel: str = "",
             logx: bool = False, logy: bool = False, hline: float | None = None, legend: bool = True) -> None:
    """series: (x, y, label) triples."""
    for x, y, label in series:
        ax.plot(np.asarray(x), np.asarray(y), label=label, linewidth=1.3)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    _decorate(ax, title, xlabel, ylabel, logx, logy)
    if legend and any(label for *_, label in series):
        ax.legend(fontsize=7, loc="best")


def scatter_on(ax, x, y, *, sizes=None, colors=None, color_label: str | None = None, annotate: Sequence[str] | None = None,
               title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False) -> None:
    """Scatter with optional per-point sizes, colours (with a colour bar) and text labels."""
    style = {"c": colors, "cmap": "viridis"} if colors is not None else {"color": "tab:blue"}
    pts = ax.scatter(np.asarray(x), np.asarray(y), s=sizes if sizes is not None else 20, alpha=0.8, edgecolors="none", **style)
    if colors is not None and color_label:
        ax.figure.colorbar(pts, ax=ax, label=color_label)
    for xi, yi, text in zip(x, y, annotate or []):
        if text:
            ax.annotate(text, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _decorate(ax, title, xlabel, ylabel, logx, logy)


def ecdf_on(ax, values, *, title: str = "", xlabel: str = "", label: str | None = None) -> None:
    """Empirical CDF: fraction of values ≤ x, as a step curve."""
    v = np.sort(np.asarray(values, dtype=float))
    ax.step(v, np.arange(1, len(v) + 1) / max(len(v), 1), where="post", label=label)
    ax.set_ylim(0, 1.02)
    _decorate(ax, title, xlabel, "fraction of layers ≤ x", False, False)


def heatmap_on(ax, x_edges, y_edges, values, *, title: str = "", xlabel: str = "", ylabel: str = "",
               logy: bool = False, color_label: str | None = None, log_color: bool = True) -> None:
    """values [len(y_edges)-1, len(x_edges)-1] drawn on (possibly non-uniform) cell edges."""
    from matplotlib.colors import LogNorm

    c = np.asarray(values, dtype=float)
    norm = None
    if log_color and (c > 0).any():
        c = np.where(c > 0, c, np.nan)
        norm = LogNorm(vmin=np.nanmin(c), vmax=np.nanmax(c))
    mesh = ax.pcolormesh(np.asarray(x_edges), np.asarray(y_edges), c, norm=norm, cmap="magma", shading="flat")
    if color_label:
        ax.figure.colorbar(mesh, ax=ax, label=color_label)
    _decorate(ax, title, xlabel, ylabel, False, logy)


def _decorate(ax, title, xlabel, ylabel, logx, logy) -> None:
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.25, linewidth=0.5)


def _legend(ax, empty: str) -> None:
    """The axis' legend, or `empty` written on it where nothing was drawn (matplotlib warned "No artists
    with labels found to put in legend" on stderr, even under --quiet)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=9)


def _positive(values):
    """Values clamped to 1e-12 so that a log axis can draw them."""
    return [max(v, 1e-12) for v in values]


# ---------------------------------------------------------------------------------------------
# Planning stages: prune's drift curve, allocate's Pareto front
# ---------------------------------------------------------------------------------------------


def plot_drift(payload: dict, path: str | Path) -> Path:
    """Left: student-vs-teacher MSE of x_t along the trajectory (selected vs uniform subset), from a
    timesteps.json payload. Right (when the payload has a sweep of step counts): final drift against
    the number of steps."""
    sweep = payload.get("sweep") or []
    fig, axes = new_figure(1, 2 if len(sweep) > 1 else 1, width=6.0, height=4.0)
    axes = np.atleast_1d(axes)
    ax = axes[0]
    curve = payload["drift_curve"]
    for key, label, style in (("selected", f"selected ({payload.get('selected_by', 'drift')})", "o-"),
                              ("uniform", "uniform (DDIM)", "s--")):
        pts = [p for p in curve.get(key) or [] if p[1] > 0]   # the start is identical (same noise): no point on a log axis
        if pts:
            ax.plot([p[0] for p in pts], _positive([p[1] for p in pts]), style, ms=3, label=label)
    for t in payload.get("protected", []):
        ax.axvline(t, color="grey", alpha=0.15, lw=2)
    ax.set_xlabel("timestep t, sampling runs 999 → 0 (protected tail shaded)")
    ax.set_ylabel("MSE(student x_t, teacher x_t)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    title = f"K={len(payload.get('timesteps', []))}"
    if payload.get("drift") is not None and payload.get("uniform_drift") is not None:
        title += f": drift {payload['drift']:.3g} vs uniform {payload['uniform_drift']:.3g}"
    if payload.get("model", {}).get("untrained"):
        title += " (UNTRAINED model)"
    ax.set_title(title, fontsize=9)
    _legend(ax, "no drift to draw: every step of the teacher's schedule kept")
    if len(sweep) > 1:
        ax = axes[1]
        ks = [s["steps"] for s in sweep]
        ax.plot(ks, _positive([s["drift"] for s in sweep]), "o-", label="selected")
        ax.plot(ks, _positive([s["uniform_drift"] for s in sweep]), "s--", label="uniform (DDIM)")
        ax.set_xlabel("kept steps")
        ax.set_ylabel(f"drift ({payload.get('metric', 'final')})")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_pareto(pareto: dict, path: str | Path) -> Path:
    """Predicted error against the budget axis (avg bits or latency), MILP front and rule-based points."""
    fig, ax = new_figure(width=6.0, height=4.0)
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
    _legend(ax, "every plan predicts zero error (nothing to draw on a log axis)")
    ax.set_title(pareto.get("title", "allocation Pareto front"), fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# bench's report (bench/report.json rows)
# ---------------------------------------------------------------------------------------------


def latency_figure(report: dict, path: str | Path) -> Path:
    """Median latency per image of every row, with min–max error bars."""
    rows = report["rows"]
    fig, ax = new_figure(width=7.0, height=3.2)
    med = [r["latency_s_per_image"]["median"] * 1000 for r in rows]
    lo = [m - r["latency_s_per_image"]["min"] * 1000 for m, r in zip(med, rows)]
    hi = [r["latency_s_per_image"]["max"] * 1000 - m for m, r in zip(med, rows)]
    ax.bar([r["name"] for r in rows], med, yerr=[lo, hi], color="#4C72B0", capsize=3)
    ax.set_ylabel("ms per image (median, min–max)")
    ax.set_title(f"Latency per image ({report['device']['name'][:40]}, {report['device']['threads']} threads)", fontsize=9)
    ax.tick_params(axis="x", rotation=25)
    return save_figure(fig, path)


def fid_bits_figure(report: dict, path: str | Path) -> Path | None:
    """FID against average weight bits, one labelled point per row with an FID; None when no row has one."""
    rows = [r for r in report["rows"] if r["fid"] is not None]
    if not rows:
        return None
    fig, ax = new_figure(width=5.5, height=3.6)
    scatter_on(ax, [r["weight_bits_avg"] for r in rows], [r["fid"] for r in rows],
               annotate=[f"{r['name']} ({r['steps']} st)" for r in rows], title="FID vs average weight bits",
               xlabel="average weight bits", ylabel=f"FID (N={report['fid']['n_samples']})")
    return save_figure(fig, path)


def sample_grid_figure(samples: dict, path: str | Path, per_row: int) -> Path | None:
    """One labelled strip of the first `per_row` samples (tensors [N, C, H, W] in [-1, 1]) per row name."""
    if not samples:
        return None
    names = list(samples)
    fig, axes = new_figure(len(names), 1, width=per_row * 0.7, height=0.85)
    for ax, name in zip(np.atleast_1d(axes), names):
        x = samples[name][:per_row].clamp(-1, 1)
        img = ((x + 1) / 2).permute(2, 0, 3, 1).reshape(x.shape[2], -1, x.shape[1]).numpy()  # H, W*k, C
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Samples, same seeds and labels in every row", fontsize=9)
    return save_figure(fig, path)


def cdf_figure(scores: dict, path: str | Path) -> Path | None:
    """CDF of the combined sensitivity score over the layers of a scores.json document; None without scores."""
    layers = scores.get("layers", {})
    vals = [v["combined_score"] for v in layers.values() if v.get("combined_score") is not None]
    if not vals:
        return None
    fig, ax = new_figure(width=5.0, height=3.2)
    ecdf_on(ax, vals, title=f"Sensitivity CDF ({len(vals)} layers)", xlabel="combined sensitivity score")
    return save_figure(fig, path)
