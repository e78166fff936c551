"""report.md and its figures from bench/report.json (plus scores.json / timesteps.json when present)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from diffpro_cli.artifacts import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return f"figures/{path.name}"


def latency_figure(report: dict, path: Path) -> str:
    plt = _plt()
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    med = [r["latency_s_per_image"]["median"] * 1000 for r in rows]
    lo = [m - r["latency_s_per_image"]["min"] * 1000 for m, r in zip(med, rows)]
    hi = [r["latency_s_per_image"]["max"] * 1000 - m for m, r in zip(med, rows)]
    ax.bar([r["name"] for r in rows], med, yerr=[lo, hi], color="#4C72B0", capsize=3)
    ax.set_ylabel("ms per image (median, min–max)")
    ax.set_title(f"Latency per image ({report['device']['name'][:40]}, {report['device']['threads']} threads)")
    ax.tick_params(axis="x", rotation=25)
    return _save(fig, path)


def fid_bits_figure(report: dict, path: Path) -> str | None:
    rows = [r for r in report["rows"] if r["fid"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in rows:
        ax.scatter(r["weight_bits_avg"], r["fid"], s=40)
        ax.annotate(f"{r['name']} ({r['steps']} st)", (r["weight_bits_avg"], r["fid"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel(f"FID (N={report['fid']['n_samples']})")
    ax.set_title("FID vs average weight bits")
    return _save(fig, path)


def sample_grid_figure(samples: dict[str, torch.Tensor], path: Path, per_row: int) -> str | None:
    if not samples:
        return None
    plt = _plt()
    names = list(samples)
    fig, axes = plt.subplots(len(names), 1, figsize=(per_row * 0.7, len(names) * 0.85))
    axes = [axes] if len(names) == 1 else axes
    for ax, name in zip(axes, names):
        x = samples[name][:per_row].clamp(-1, 1)
        strip = torch.cat(list((x + 1) / 2), dim=-1)  # C, H, W*k
        img = strip.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Samples, same seeds and labels in every row", fontsize=9)
    return _save(fig, path)


def cdf_figure(scores_path: Path, path: Path) -> str | None:
    if not scores_path.exists():
        return None
    layers = json.loads(scores_path.read_text()).get("layers", {})
    vals = sorted(v.get("combined_score") for v in layers.values() if v.get("combined_score") is not None)
    if not vals:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post")
    ax.set_xlabel("combined sensitivity score")
    ax.set_ylabel("CDF over layers")
    ax.set_title(f"Sensitivity CDF ({len(vals)} layers)")
    return _save(fig, path)


def drift_figure(timesteps_path: Path, path: Path) -> str | None:
    """MSE between student and teacher x_t at every kept step, for the selected and the uniform subset
    (prune's `drift_curve`: {"selected": [[t, mse], ...], "uniform": [[t, mse], ...], ...})."""
    if not timesteps_path.exists():
        return None
    data = json.loads(timesteps_path.read_text())
    curve = data.get("drift_curve")
    if not isinstance(curve, dict) or not curve.get("selected"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for key, label in (("uniform", "uniform (DDIM) subset"), ("selected", "drift-selected subset")):
        points = curve.get(key) or []
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    ax.set_xlabel("timestep (sampling runs left to right, 999 → 0)")
    ax.invert_xaxis()
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_ylabel("MSE to teacher x_t")
    ax.set_title(f"Teacher–student drift (kept {len(data.get('timesteps', []))} steps)")
    return _save(fig, path)


def _fmt(v, spec="{:.3g}"):
    return "n/a" if v is None else spec.format(v)


def write_markdown(report: dict, bench_dir: Path, samples: dict, workdir: Path, grid_n: int = 10) -> Path:
    figs = bench_dir / "figures"
    made = {
        "latency": latency_figure(report, figs / "latency.png"),
        "fid": fid_bits_figure(report, figs / "fid_vs_bits.png"),
        "samples": sample_grid_figure(samples, figs / "samples.png", grid_n),
        "cdf": cdf_figure(workdir / "scores.json", figs / "sensitivity_cdf.png"),
        "drift": drift_figure(workdir / "timesteps.json", figs / "drift.png"),
    }
    d = report.get("derived", {})
    lines = [
        f"# diffpro report — {report['model']['spec']}",
        "",
        f"Device: {report['device']['name']} ({report['device']['kind']}, {report['device']['threads']} threads, torch {report['device']['torch']}). "
        f"Sampler: {report['sampler']['method']}, cfg {report['sampler']['cfg_scale']}. Seed {report['fid']['seed']}.",
        "",
    ]
    if report["fid"]["n_samples"]:
        lines += [f"FID: N = {report['fid']['n_samples']} samples per row against `{report['fid']['reference']}`"
                  f" (reference N = {report['fid'].get('reference_n') or 'n/a'}); small N biases FID upwards, so compare rows, not papers.", ""]
    lines += ["| row | steps | avg bits | size | speedup | compression | latency/img (median) | peak mem | FID | ΔFID | FID vs fp32 | energy/img |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        dr = d.get(r["name"], {})
        lines.append(
            f"| {r['name']} | {r['steps']} | {_fmt(r['weight_bits_avg'], '{:.2f}')} | {r['size_bytes'] / 1e6:.2f} MB | "
            f"{_fmt(dr.get('speedup'), '{:.2f}x')} | {_fmt(dr.get('compression'), '{:.2f}x')} | "
            f"{r['latency_s_per_image']['median'] * 1000:.1f} ms | "
            f"{_fmt(r['peak_mem_bytes'] / 1e6 if r['peak_mem_bytes'] is not None else None, '{:.0f} MB')} | "
            f"{_fmt(r['fid'], '{:.2f}')} | {_fmt(dr.get('delta_fid'), '{:+.2f}')} | {_fmt(r['fid_vs_fp'], '{:.2f}')} | "
            f"{_fmt(r['energy_j_per_image'], '{:.3f} J')} |")
    lines += ["", "Kernels per row (layer count): " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{k}×{v}" for k, v in r["kernels"].items()) for r in report["rows"]), ""]
    for title, key in (("Latency", "latency"), ("FID vs average bits", "fid"), ("Samples", "samples"),
                       ("Sensitivity CDF", "cdf"), ("Timestep drift", "drift")):
        if made[key]:
            lines += [f"## {title}", "", f"![{title}]({made[key]})", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    for r in report["rows"]:
        for n in r.get("notes", []):
            lines.append(f"- {r['name']}: {n}")
    path = bench_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
