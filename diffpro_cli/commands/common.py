"""Options shared by every subcommand (declare them with these aliases so they read the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.console import UI

Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Work directory for artifacts and the lock file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")]
Force = Annotated[bool, typer.Option("--force", help="Recompute even if the stage is up to date.")]
Wait = Annotated[bool, typer.Option("--wait", help="If another diffpro process is using the workdir, wait for it instead of exiting with code 2.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice (recorded in artifacts).")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="Allow importing module:factory code and non-weights-only pickles.")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Weights file for a module:factory model.")]
ModelArg = Annotated[str, typer.Argument(help="builtin:NAME, random:ARCH, a diffusers dir, a DiT .pt, a quantized dir, or module:factory.")]

DEFAULT_WORKDIR = Path("diffpro-work")


def make_ui(quiet: bool, json_output: bool) -> UI:
    return UI(quiet=quiet or json_output, json_output=json_output)


def make_context(model: str | None, workdir, *, trust_code: bool = False, weights=None, seed: int = 0,
                 quiet: bool = False, json_output: bool = False, force: bool = False, wait: bool = False):
    """The one StageContext a command hands to its stage: load options, workdir, UI, force, wait."""
    from diffpro_cli.stages.context import StageContext

    return StageContext.create(model or "", workdir, trust_code=trust_code, weights=weights, seed=seed,
                               ui=make_ui(quiet, json_output), force=force, wait=wait)
