from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import Force, Wait, JsonOut, Quiet, TrustCode, Weights, interruptible, make_ui


def run_cmd(
    config: Annotated[Path, typer.Argument(help="TOML config (see sample_configs/).")],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Override the config's workdir.")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Comma list overriding the config's stages.")] = None,
    trust_code: TrustCode = False,
    weights: Weights = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Override the config's device: cpu, cuda or cuda:N.")] = None,
    force: Force = False,
    wait: Wait = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Run profile → score → prune → allocate → quantize → bench from one config, skipping up-to-date stages."""
    with interruptible():   # Ctrl-C / SIGTERM: one error line, exit 130
        _run(config, workdir, stages, trust_code, weights, device, force, wait, json_output, quiet)


def _run(config, workdir, stages, trust_code, weights, device, force, wait, json_output, quiet):
    from diffpro_cli.errors import UsageError
    from diffpro_cli.stages.run import STAGES, load_run_config, run_pipeline

    ui = make_ui(quiet, json_output)
    cfg = load_run_config(config)
    if workdir is not None:
        cfg.workdir = str(workdir)
    if trust_code:          # given once, it reaches every stage (the config's trust_code = true does the same)
        cfg.trust_code = True
    if weights is not None:
        cfg.weights = str(weights)
    if device is not None:
        cfg.device = device
    if stages is not None:
        cfg.stages = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in cfg.stages if s not in STAGES]
        if bad:
            raise UsageError(f"--stages: unknown {', '.join(bad)}; choose from {', '.join(STAGES)}")
        if not cfg.stages:   # ran nothing and reported "done"
            raise UsageError(f"--stages {stages!r} names no stage; give a comma list such as profile,score")
    outcomes = run_pipeline(cfg, force=force, wait=wait, ui=ui)
    report = Path(cfg.workdir) / "bench" / "report.md"
    ui.result({"workdir": cfg.workdir, "stages": outcomes},
              human=f"done: {', '.join(o['stage'] + ' ' + o['status'] for o in outcomes)}"
                    + (f"\nreport: {report}" if report.exists() else ""))
