from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import DEFAULT_WORKDIR, Force, JsonOut, ModelArg, Quiet, TrustCode, Workdir
from diffpro_cli.errors import NotImplementedStage


def score_cmd(
    source: Annotated[Path, typer.Argument(help="Input artifact or config file.")] = Path("."),
    workdir: Workdir = DEFAULT_WORKDIR,
    force: Force = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Compute manifold-aware layer sensitivity scores from a profile."""
    raise NotImplementedStage("score: not available yet (sensitivity scoring lands with issue #6); nothing was written")
