from __future__ import annotations

from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import ModelArg, Seed, parse_int_list, stage_command


@stage_command
def profile_cmd(
    ctx,
    model: ModelArg = "builtin:dit-mnist",
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples (trajectories).")] = 32,
    timesteps: Annotated[str, typer.Option("--timesteps", help="Calibration timesteps: START:STOP:STEP (inclusive) or a comma list.")] = "1000:0:50",
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma list of class ids, cycled over samples (default i % classes).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Samples per model call (does not change the statistics' inputs).")] = 16,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale of the calibration sampler (1 = off).")] = 1.0,
    method: Annotated[str, typer.Option("--method", help="Calibration sampler: ddim or ddpm.")] = "ddim",
    max_dim: Annotated[int, typer.Option("--max-dim", help="Layers wider than this keep a CountSketch of this width for PCA.")] = 2048,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows per model call fed to the covariance (seeded subsample).")] = 1024,
    seed: Seed = 0,
):
    """Record per-layer, per-timestep activation statistics (calibration sampling) in WORKDIR/profile."""
    from diffpro_cli.stages.profile import ProfileConfig, run_profile

    ui = ctx.ui
    cfg = ProfileConfig(samples=samples, timesteps=timesteps, classes=parse_int_list(classes, "--classes", keep_order=True) or None, seed=seed, batch=batch,
                        cfg_scale=cfg_scale, method=method, max_dim=max_dim, max_rows=max_rows)
    result = run_profile(ctx, cfg)
    outcome, m = result.outcome, result.value
    ui.result(outcome.as_dict() | {"model": m.spec, "untrained": m.untrained, "random_weights": m.random_weights},
              human=f"profile: {outcome.status} ({outcome.wall_s:.1f}s) -> {outcome.outputs['profile']}"
                    + (" [UNTRAINED model]" if m.untrained else "") + (" [RANDOM weights]" if m.random_weights else ""))
