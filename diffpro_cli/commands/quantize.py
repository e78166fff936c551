from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import ModelArg, Seed, parse_role_list, stage_command


@stage_command
def quantize_cmd(
    ctx,
    model: ModelArg = "builtin:dit-mnist",
    plan: Annotated[Optional[Path], typer.Option("--plan", help="plan.json from `diffpro allocate` (per-layer bits and activation mode).")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Uniform weight bits for every layer (2, 3, 4, 6, 8) instead of a plan.")] = None,
    act_bits: Annotated[Optional[int], typer.Option("--act-bits", help="With --bits: 8 (int8 activations, the default) or 16 (weight-only). A plan sets it per layer.", show_default=False)] = None,
    act_mode: Annotated[Optional[str], typer.Option("--act-mode", help="With --bits: dynamic (per-tensor, every call; fastest; the default), dynamic-token (per-token, every call), or static (per-timestep calibrated). With --plan only the plan's own mode is accepted.", show_default=False)] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="With --bits: weight scales per group of this many inputs (default: per output channel).")] = None,
    float_act: Annotated[str, typer.Option("--float-act", help="With --bits: roles computed on float activations from their stored weights ('none' for all-integer; docs/quantization.md).")] = "patch_embed,final",
    timesteps: Annotated[Optional[Path], typer.Option("--timesteps", help="timesteps.json from `diffpro prune`: stored in the checkpoint; static ranges are calibrated on it.")] = None,
    rounding: Annotated[str, typer.Option("--rounding", help="nearest (round-to-nearest) or gptq (output-aware rounding of Linear weights from the float model's own trajectories; same format and kernels).")] = "nearest",
    pair_bound: Annotated[str, typer.Option("--pair-bound", help="auto, on or off: bound 8-bit weights (nearest or GPTQ) so that CPUs without VNNI run them with 8-bit activations instead of 7-bit (auto: on exactly there; docs/quantization.md, Saturation).")] = "auto",
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Trajectories that calibrate static ranges and GPTQ inputs.")] = 4,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint directory (default WORKDIR/quantized).")] = None,
    seed: Seed = 0,
):
    """Write a real integer checkpoint (model.safetensors + diffpro.json) from a plan or uniform --bits."""
    from diffpro_cli.stages.quantize import QuantizeConfig, run_quantize

    ui = ctx.ui
    out_dir = out if out is not None else ctx.workdir / "quantized"
    m = ctx.model()
    if m.untrained:
        ui.warn(f"{m.spec} is UNTRAINED (seeded random weights): the checkpoint is for speed and size only")
    cfg = QuantizeConfig(bits=bits, act_bits=act_bits, act_mode=act_mode, group_size=group_size, rounding=rounding,
                         calib_samples=calib_samples, seed=seed, pair_bound=pair_bound,
                         float_act=parse_role_list(float_act))
    result = run_quantize(ctx, cfg, plan_path=plan, timesteps_path=timesteps, out_dir=out_dir)
    outcome, meta = result.outcome, result.value
    totals = meta["totals"]
    ratio = totals["fp32_bytes"] / totals["bytes"] if totals.get("bytes") else None
    kernels = sorted({rec["kernel"] for rec in meta["layers"].values()})
    ui.result({"out": str(out_dir), "status": outcome.status, "avg_bits": totals["avg_bits"], "bytes": totals["bytes"],
               "fp32_bytes": totals["fp32_bytes"], "compression": ratio, "quantized_layers": totals["quantized_layers"],
               "float_layers": totals["float_layers"], "kernels": kernels, "timesteps": meta.get("timesteps")},
              human=(f"{outcome.status}: {out_dir} — {totals['quantized_layers']} integer layers, {totals['float_layers']} float, "
                     f"avg {totals['avg_bits']:.2f} bits, {totals['bytes'] / 1e6:.2f} MB ({ratio:.2f}x smaller than fp32)"))
