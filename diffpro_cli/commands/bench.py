from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import ModelArg, Seed, stage_command
from diffpro_cli.errors import InputError, UsageError


@stage_command
def bench_cmd(
    ctx,
    model: ModelArg = "builtin:dit-mnist",
    quantized: Annotated[Optional[Path], typer.Option("--quantized", help="diffpro checkpoint dir (default WORKDIR/quantized if present).")] = None,
    timesteps: Annotated[Optional[Path], typer.Option("--timesteps", help="timesteps.json for the diffpro row (default WORKDIR/timesteps.json where it holds the checkpoint's steps, else the checkpoint's).")] = None,
    rows: Annotated[Optional[str], typer.Option("--rows", help="Comma list of rows: fp32,bf16,w8a8-uniform,w4-uniform,ddim,bf16-ddim,dpmsolver,subset (fp32 on diffpro's timesteps),diffpro,ddim-same-latency (float DDIM on as many steps as cost diffpro's measured latency) (default: all of them, bf16 and bf16-ddim only where the device runs bf16 natively); on request cache-only, fbcache-0.08, fbcache-0.12 (DiTs), deepcache-2, deepcache-3 (U-Nets), diffpro-nocache.")] = None,
    reference_steps: Annotated[int, typer.Option("--reference-steps", help="Steps of the full-precision schedule.")] = 100,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Reduced step count for ddim/dpmsolver rows (default: diffpro's timesteps' count; without timesteps, half of --reference-steps).")] = None,
    method: Annotated[str, typer.Option("--method", help="Sampler for every row: ddim or ddpm (epsilon/v models), euler (flow-matching models; ddim with eta 0 is the same update there).")] = "ddim",
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 1.0,
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="Compute FID (pytorch-fid InceptionV3).")] = False,
    fid_n: Annotated[int, typer.Option("--fid-n", help="Samples per row for FID.")] = 200,
    reference: Annotated[str, typer.Option("--reference", help="FID reference: builtin:mnist or a pytorch-fid .npz.")] = "builtin:mnist",
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="FID Inception weights file.")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats per row (after one warm-up).")] = 5,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Images per timed sampling call.")] = 8,
    latency_steps: Annotated[Optional[int], typer.Option("--latency-steps", help="Time only this many steps and scale (huge models).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="The diffpro row runs its checkpoint's cache schedule (reused computation across steps); --no-cache computes every unit on the plan's steps.")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile every row, fp32 baselines included (quantized rows on the compiled int8 path); costs a compile per model.")] = False,
    seed: Seed = 0,
):
    """Measure FID, latency, memory, size and energy of diffpro's plan against every baseline."""
    import torch

    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.bench import BenchConfig, default_rows, run_bench

    ui = ctx.ui
    names = default_rows(ctx.device) if rows is None else [r.strip() for r in rows.split(",") if r.strip()]
    cfg = BenchConfig(rows=names, reference_steps=reference_steps, steps=steps, method=method, cfg_scale=cfg_scale,
                      fid=fid, fid_n=fid_n, reference=reference, inception_weights=inception_weights, seed=seed,
                      repeats=repeats, latency_batch=latency_batch, latency_steps=latency_steps, compile=compile,
                      cache=cache)   # its options are checked first thing in run_bench
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1 when given")
    if threads:
        torch.set_num_threads(threads)
    from diffpro_cli.distributed import init_from_env

    init_from_env(ctx.device)  # no-op unless started by torchrun
    if quantized is not None and not (quantized / "diffpro.json").exists():
        raise InputError(f"--quantized {quantized}: no diffpro.json there; run `diffpro quantize` first")
    from diffpro_cli.stages.bench_options import default_inputs

    quantized, timesteps = default_inputs(ctx.workdir, quantized, timesteps)
    outcome = run_bench(ctx, cfg, quantized=quantized, timesteps_path=timesteps).outcome
    from diffpro_cli.distributed import is_main

    if not is_main():
        return
    report = read_json(ctx.workdir / "bench" / "report.json", "diffpro.report/1")
    report["stage"] = outcome.as_dict()
    lines = [f"{r['name']:>14s}: {r['steps']:4d} steps, {r['weight_bits_avg']:5.2f} bits, "
             f"{r['latency_s_per_image']['median'] * 1000:8.1f} ms/img, speedup {report['derived'][r['name']]['speedup']:.2f}x vs {report['baseline']}"
             + (f", FID {r['fid']:.2f}" if r["fid"] is not None else "") for r in report["rows"]]
    ui.result(report, human="\n".join(lines) + f"\nwrote {ctx.workdir / 'bench' / 'report.json'} and report.md")
