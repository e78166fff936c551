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


def model_input_record(model) -> dict:
    """Lock-file input record for a loaded model (its weights' sha256, or the spec for random/untrained)."""
    from diffpro_cli.artifacts import sha256_json

    return {"path": model.spec, "sha256": model.sha256 or sha256_json({"spec": model.spec, "untrained": model.untrained})}
