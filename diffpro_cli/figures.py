"""Small matplotlib helpers: headless (Agg, no pyplot state), atomic PNG writes, deterministic output.

Usage: `fig, axes = new_figure(1, 2)`, draw with the `*_on` helpers or plain matplotlib calls on the axes,
then `save_figure(fig, path)`. Nothing here knows about diffpro artifacts.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np


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
