"""bench/report.md from bench/report.json (plus scores.json / timesteps.json when present); the
figures it links are drawn by `diffpro_cli.plots`."""

from __future__ import annotations

import json
from pathlib import Path

from diffpro_cli import plots
from diffpro_cli.artifacts import atomic_write_bytes


def _figures(report: dict, figs: Path, samples: dict, workdir: Path, grid_n: int) -> dict[str, str | None]:
    """Draw the report's figures into `figs`; {key: path relative to bench/, or None when not drawn}."""
    scores_path, timesteps_path, pareto_path = workdir / "scores.json", workdir / "timesteps.json", workdir / "pareto.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    timesteps = json.loads(timesteps_path.read_text()) if timesteps_path.exists() else {}
    pareto = json.loads(pareto_path.read_text()) if pareto_path.exists() else None
    curve = timesteps.get("drift_curve")
    made = {
        "latency": plots.latency_figure(report, figs / "latency.png"),
        "fid": plots.fid_bits_figure(report, figs / "fid_vs_bits.png"),
        "samples": plots.sample_grid_figure(samples, figs / "samples.png", grid_n),
        "cdf": plots.cdf_figure(scores, figs / "sensitivity_cdf.png"),
        "drift": plots.plot_drift(timesteps, figs / "drift.png")
        if isinstance(curve, dict) and curve.get("selected") else None,
        "pareto": plots.plot_pareto(pareto, figs / "pareto.png") if pareto and pareto.get("points") else None,
    }
    return {k: None if p is None else f"figures/{Path(p).name}" for k, p in made.items()}


def _fmt(v, spec="{:.3g}"):
    return "n/a" if v is None else spec.format(v)


def _fmt_min(value) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _with_ci(v, ci, spec="{:.2f}"):
    """'12.34 [11.02, 13.90]', or the value alone when no interval was measured."""
    if v is None:
        return "n/a"
    return spec.format(v) if not ci else f"{spec.format(v)} [{spec.format(ci[0])}, {spec.format(ci[1])}]"


def _kid(r):
    if r.get("kid") is None:
        return "n/a"
    return f"{r['kid'] * 1000:.2f} ± {r['kid_std'] * 1000:.2f}"


def isa_text(device: dict) -> str:
    """'; ISA avx2 avx512_vnni: integer kernels VNNI, bf16 native; capped by X=Y' (CPU reports that carry it)."""
    if "isa_flags" not in device:
        return ""
    text = (f"; ISA {' '.join(device['isa_flags']) or 'none of ours'}: integer kernels {device.get('integer_kernels', '?')}, "
            f"bf16 {device.get('bf16', '?')}")
    return text + (f"; capped by {device['isa_cap']}" if device.get("isa_cap") else "")


def significance_line(report: dict) -> str | None:
    """One line: which differences have a paired 95 % interval that excludes 0 at this run's N."""
    from diffpro_cli.metrics.stats import excludes_zero

    d = report.get("derived", {})
    base = report.get("baseline")
    sig, flat = [], []
    for r in report["rows"]:
        ci = d.get(r["name"], {}).get("delta_fid_ci95")
        if r["name"] == base or ci is None:
            continue
        (sig if excludes_zero(ci) else flat).append(f"{r['name']} vs {base} (ΔFID {d[r['name']]['delta_fid']:+.2f})")
    for v in report.get("versus_step_cut", []) + report.get("versus_cache", []):
        ci = v.get("delta_fid_vs_fp_ci95")
        if ci is not None:
            (sig if excludes_zero(ci) else flat).append(
                f"diffpro vs {v['row']} (Δ FID vs fp32 {v['delta_fid_vs_fp']:+.2f})")
    if not sig and not flat:
        return None
    n = report["fid"]["n_samples"]
    return (f"Significant at N = {n} (paired 95 % bootstrap interval excludes 0): {', '.join(sig) or 'none'}. "
            f"Not significant: {', '.join(flat) or 'none'}.")


def write_markdown(report: dict, bench_dir: Path, samples: dict, workdir: Path, grid_n: int = 10) -> Path:
    made = _figures(report, bench_dir / "figures", samples, workdir, grid_n)
    d = report.get("derived", {})
    lines = [
        f"# diffpro report — {report['model']['spec']}",
        "",
        f"Device: {report['device']['name']} ({report['device']['kind']}, {report['device']['threads']} threads, torch {report['device']['torch']}"
        f"{isa_text(report['device'])}"
        f"{'; malloc: ' + report['device']['allocator'] if report['device'].get('allocator') else ''}). "
        f"Sampler: {report['sampler']['method']}, cfg {report['sampler']['cfg_scale']}. Seed {report['fid']['seed']}.",
        "",
    ]
    strongest = report.get("strongest_float_baseline")
    if strongest:   # the float baseline the plan must beat here: ddim-K or bf16-ddim-K, whichever is faster
        lines += [f"**Summary:** {strongest['line']}.", ""]
    if report["fid"]["n_samples"]:
        lines += [f"FID: N = {report['fid']['n_samples']} samples per row against `{report['fid']['reference']}`"
                  f" (reference N = {report['fid'].get('reference_n') or 'n/a'}); small N biases FID upwards, so compare rows, not papers.", ""]
    ev = report["fid"].get("evidence")
    if ev:
        kid = ev["kid"]
        lines += [(f"[95% CI]: bootstrap over the N generated samples ({ev['bootstrap']['resamples']} resamples, "
                  f"seed {ev['bootstrap']['seed']}, same resamples for every row), an interval for FID at this N. "
                  f"KID ×10³: mean ± std over {kid['subsets']} subsets"
                  f"{' against ' + str((kid.get('reference') or {}).get('n')) + ' reference images' if (kid.get('reference') or {}).get('n') else ''}. "
                  f"PSNR vs fp32: mean over the first {ev['paired']['n_max']} (at most) same-seed image pairs."), ""]
    base = report.get("baseline", "fp32")   # the derived columns' reference row (the first row without fp32)
    lines += [(f"| row | steps | avg bits | size | speedup vs {base} (of minima) | compression vs {base} | "
               f"latency/img (median) | peak mem | FID [95% CI] | ΔFID vs {base} | "
               "FID vs fp32 | KID ×10³ | PSNR vs fp32 | energy/img |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        dr = d.get(r["name"], {})
        lines.append(
            f"| {r['name']} | {r['steps']} | {_fmt(r['weight_bits_avg'], '{:.2f}')} | {r['size_bytes'] / 1e6:.2f} MB | "
            f"{_fmt(dr.get('speedup'), '{:.2f}x')}{_fmt_min(dr.get('speedup_min'))} | {_fmt(dr.get('compression'), '{:.2f}x')} | "
            f"{r['latency_s_per_image']['median'] * 1000:.1f} ms | "
            f"{_fmt(r['peak_mem_bytes'] / 1e6 if r['peak_mem_bytes'] is not None else None, '{:.0f} MB')} | "
            f"{_with_ci(r['fid'], r.get('fid_ci95'))} | {_fmt(dr.get('delta_fid'), '{:+.2f}')} | "
            f"{_with_ci(r['fid_vs_fp'], r.get('fid_vs_fp_ci95'))} | {_kid(r)} | "
            f"{_with_ci(r.get('psnr_vs_fp32'), r.get('psnr_vs_fp32_ci95'), '{:.1f}')}"
            f"{' dB' if r.get('psnr_vs_fp32') is not None else ''} | "
            f"{_fmt(r['energy_j_per_image'], '{:.3f} J')} |")
    line = significance_line(report)
    if line:
        lines += ["", line]
    min_n = (report["fid"].get("evidence") or {}).get("bootstrap", {}).get("min_n")
    if min_n and report["fid"]["n_samples"] and report["fid"]["n_samples"] < min_n:
        lines += ["", f"No 95 % intervals and no significance at N = {report['fid']['n_samples']}: a bootstrap interval "
                      f"from fewer than {min_n} samples covers far less than 95 % (pass --fid-n {min_n} or more)."]
    kid_ref = report["fid"].get("evidence", {}).get("kid", {}).get("reference") or {}
    if "note" in kid_ref:
        lines += ["", f"KID not measured: {kid_ref['note']}."]
    lines += ["", "Kernels per row (layer count): " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{k}×{v}" for k, v in r["kernels"].items()) for r in report["rows"]), ""]
    for title, key in (("Latency", "latency"), ("FID vs average bits", "fid"), ("Samples", "samples"),
                       ("Sensitivity CDF", "cdf"), ("Timestep drift", "drift"),
                       ("Plan: predicted error along the budget (allocate --pareto)", "pareto")):
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
