from __future__ import annotations

from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import ModelArg, Seed, parse_int_list, stage_command


@stage_command
def prune_cmd(
    ctx,
    model: ModelArg = "builtin:dit-mnist",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Number of timesteps to keep (K).")] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Or keep this fraction of the training steps (default 0.5).")] = None,
    protect_tail: Annotated[Optional[int], typer.Option("--protect-tail", help="Always keep the T lowest-noise candidate steps (default max(1, 10% of K)).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="final: MSE of final samples; trajectory: mean MSE over kept steps and final.")] = "final",
    search: Annotated[str, typer.Option("--search", help="best (dp, greedy and uniform, keep the least measured drift), dp or greedy.")] = "best",
    reference_steps: Annotated[Optional[int], typer.Option("--reference-steps", help="Teacher schedule size (default: every training step); use e.g. 250 for large models.")] = None,
    candidates: Annotated[Optional[int], typer.Option("--candidates", help="Candidate grid size (default min(reference, max(100, 2 x the largest step count))).")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Also select subsets for these step counts (comma list), for `allocate --steps auto`.")] = None,
    n: Annotated[int, typer.Option("--n", help="Calibration samples.")] = 16,
    batch: Annotated[int, typer.Option("--batch", help="Batch size (does not change results).")] = 16,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale for teacher and student (1 = off).")] = 1.0,
    clip_x0: Annotated[Optional[bool], typer.Option("--clip-x0/--no-clip-x0", help="Clip predicted x0 to [-1, 1] while measuring drift (default: as the samplers do for this model: pixel space yes, VAE latents no).")] = None,
    seed: Seed = 0,
):
    """Select a budgeted timestep subset guided by teacher-student drift; writes WORKDIR/timesteps.json."""
    from diffpro_cli.stages.prune import PruneConfig, run_prune

    ui = ctx.ui
    cfg = PruneConfig(steps=steps, fraction=fraction, protect_tail=protect_tail, reference_steps=reference_steps,
                      candidates=candidates, search=search, metric=metric, n=n, batch=batch, seed=seed,
                      cfg_scale=cfg_scale, clip_x0=clip_x0, sweep=parse_int_list(sweep, "--sweep"))
    result = run_prune(ctx, cfg)
    outcome, payload = result.outcome, result.value
    result = {**outcome.as_dict(), "steps": len(payload["timesteps"]), "protect_tail": payload["protect_tail"],
              "drift": payload["drift"], "uniform_drift": payload["uniform_drift"], "selected_by": payload["selected_by"],
              "untrained": payload["model"].get("untrained", False)}
    # uniform drift 0: every reference step kept (K = --reference-steps), there is no ratio ("nanx" before)
    ratio = f"{payload['drift'] / payload['uniform_drift']:.2f}x" if payload["uniform_drift"] else "the teacher's own schedule"
    ui.result(result, human=(f"{outcome.outputs['timesteps']}: {result['steps']} steps, drift {payload['drift']:.4g} vs "
                             f"uniform {payload['uniform_drift']:.4g} ({ratio}, {payload['selected_by']})"
                             f"{', UNTRAINED model' if result['untrained'] else ''}"
                             f"{' [up to date]' if outcome.status == 'up to date' else ''}"))
