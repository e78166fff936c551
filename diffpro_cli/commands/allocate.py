from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import parse_int_list, parse_role_list, stage_command
from diffpro_cli.errors import UsageError


@stage_command
def allocate_cmd(
    ctx,
    scores: Annotated[Optional[Path], typer.Argument(help="scores.json from `diffpro score` (default WORKDIR/scores.json).")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="avg-bits=5.0 | size-mb=3.5 | latency-ms=2.0 (per step and image) | latency=0.4 (fraction of the fp32 full-schedule latency; chooses the steps too); comma-separated to combine.")] = None,
    bits: Annotated[str, typer.Option("--bits", help="Weight bit options (from 2,3,4,6,8,16; 16 = keep fp32).")] = "4,8,16",
    act_bits: Annotated[str, typer.Option("--act-bits", help="Execution paths: 8 (integer kernels, DiffPro's dynamic int8 activations) and/or 16 (float compute from the stored low-bit weights). With both, each layer runs the faster one on this machine unless a latency budget trades them.")] = "8,16",
    act_mode: Annotated[str, typer.Option("--act-mode", help="dynamic (one scale per input tensor, found at every call) or static (per-timestep calibrated).")] = "dynamic",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Weight scale group size along the input dim (default per output channel).")] = None,
    method: Annotated[str, typer.Option("--method", help="milp (exact) or cdf (the paper's rank/CDF-threshold rule).")] = "milp",
    protect: Annotated[str, typer.Option("--protect", help="Roles kept at >= --protect-bits unless the budget forces otherwise ('none' to disable).")] = "patch_embed,time_embed,class_embed,context_embed,adaln,final",
    protect_bits: Annotated[int, typer.Option("--protect-bits", help="Weight-bit floor for protected roles.")] = 8,
    float_act: Annotated[str, typer.Option("--float-act", help="Roles computed on float activations from their stored low-bit weights when 16 is in --act-bits ('none' to disable; docs/quantization.md).")] = "patch_embed,final",
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", help="Also keep each step at least this much faster than the fastest float here (fp32, or bf16 where native; measured cost table, same run), e.g. 1.5.")] = None,
    latency_budget: Annotated[Optional[float], typer.Option("--latency-budget", help="Joint plan: total ms per image over all steps (chooses steps and bits).")] = None,
    timesteps: Annotated[Optional[Path], typer.Option("--timesteps", help="timesteps.json from `diffpro prune` (its sweep gives the step counts).")] = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="Joint plan: auto (every step count in the timesteps sweep) or a step count.")] = None,
    quant_weight: Annotated[float, typer.Option("--quant-weight", help="Joint plan: weight of the quantization error against the step drift.")] = 1.0,
    batch: Annotated[int, typer.Option("--batch", help="Images per call the cost table is timed at (use bench's --latency-batch).")] = 8,
    cost_table: Annotated[Optional[Path], typer.Option("--cost-table", help="Plan with this cost table (e.g. measured on the target machine) instead of WORKDIR/cost_table.json.")] = None,
    full_steps: Annotated[int, typer.Option("--full-steps", help="Steps of the fp32 full schedule that --budget latency=F is a fraction of (bench's --reference-steps).")] = 50,
    latency_source: Annotated[str, typer.Option("--latency-source", help="measured (real kernels) or analytic (labelled estimate).")] = "measured",
    remainder_ms: Annotated[Optional[float], typer.Option("--remainder-ms", help="Non-GEMM time per step (default: measured from the model).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timing rounds of the cost table (every cell once per round, round-robin; the minimum is kept).")] = 15,
    error_model: Annotated[str, typer.Option("--error-model", help="auto (measured > taylor > proxy > score > cdf), or one of them.")] = "auto",
    pareto: Annotated[bool, typer.Option("--pareto", help="Also write WORKDIR/pareto.json and figures/pareto.png.")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Bits x steps x cache: also try reused computation (cache schedules, on the plan's steps and more); kept only when it wins by --cache-objective (docs/caching.md).")] = False,
    cache_objective: Annotated[str, typer.Option("--cache-objective", help="With --cache: latency (the fastest schedule that drifts no more than the plan) or drift (the least drift at the plan's latency).")] = "latency",
    cache_metric: Annotated[str, typer.Option("--cache-metric", help="With --cache: the drift of that comparison: inception (paired FID Inception features of the decoded samples vs the float teacher's; mse when the weights are missing) or mse (final samples).")] = "inception",
    cache_n: Annotated[int, typer.Option("--cache-n", help="With --cache: calibration samples of the drift comparison.")] = 8,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Measure the plan against float DDIM on as many steps as fit its predicted latency (paired, fp32 on --full-steps as the reference); a joint plan keeps the step count measured closest to fp32.")] = True,
    check_n: Annotated[int, typer.Option("--check-n", help="Calibration samples of that check.")] = 16,
    check_metric: Annotated[str, typer.Option("--check-metric", help="Distance to fp32 of that check: inception (paired FID features; mse where the weights are missing) or mse (final samples).")] = "inception",
    check_rounding: Annotated[str, typer.Option("--check-rounding", help="How that check rounds the plan's weights: as quantize --rounding will (nearest or gptq).")] = "nearest",
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="Plan for torch.compile'd execution (bench --compile, diffpro.compile): the cost table also times every path compiled, and the plan must beat compiled float.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Model timed for the non-GEMM remainder (default: the scored one).")] = None,
):
    """Solve the per-layer bit allocation (and, with --latency-budget, the step count) under a budget; writes WORKDIR/plan.json."""
    from diffpro_cli.stages.allocate import AllocateConfig, run_allocate

    ui = ctx.ui
    if repeats < 1 or batch < 1 or full_steps < 1:
        raise UsageError("--repeats, --batch and --full-steps must be at least 1")
    cfg = AllocateConfig(budget=budget, bits=parse_int_list(bits, "--bits"), act_bits=parse_int_list(act_bits, "--act-bits"),
                         act_mode=act_mode, group_size=group_size, method=method, protect=parse_role_list(protect), protect_bits=protect_bits, float_act=parse_role_list(float_act),
                         latency_budget=latency_budget, min_speedup=min_speedup, steps=steps, quant_weight=quant_weight, batch=batch,
                         cost_table=None if cost_table is None else str(cost_table), full_steps=full_steps,
                         latency_source=latency_source, repeats=repeats, remainder_ms=remainder_ms, pareto=pareto,
                         error_model=error_model, cache=cache, cache_objective=cache_objective, cache_metric=cache_metric,
                         cache_n=cache_n, compile=compile_, check=check, check_n=check_n, check_metric=check_metric,
                         check_rounding=check_rounding)
    result = run_allocate(ctx, cfg, scores_path=scores, timesteps_path=timesteps)
    outcome, plan = result.outcome, result.value
    t = plan["totals"]
    lat = f", {t['latency_ms']:.3f} ms/step" if t.get("latency_ms") is not None else ""
    if t.get("predicted_speedup"):
        lat += f" ({t['predicted_speedup']:.2f}x float in {plan.get('world') or plan.get('compute_dtype') or 'float32'})"
    joint = plan.get("joint")
    steps_txt = f", {joint['steps']} steps ({joint['total_latency_ms']:.1f} ms/image)" if joint else ""
    if (plan.get("step_cut_check") or {}).get("verdict"):
        steps_txt += f"; {plan['step_cut_check']['verdict']}"
    if (plan.get("cache") or {}).get("verdict"):
        steps_txt += f"; cache: {plan['cache']['verdict']}"
    result = {**outcome.as_dict(), "totals": t, "solver": plan["solver"], "joint": joint}
    ui.result(result, human=(f"{outcome.outputs['plan']}: avg {t['avg_bits']:.3f} bits, {t['bytes'] / 1e6:.3f} MB{lat}{steps_txt}, "
                             f"predicted error {t['error']:.4g} ({plan['solver']['method']}, {plan['solver']['status']})"
                             f"{' [up to date]' if outcome.status == 'up to date' else ''}"))
