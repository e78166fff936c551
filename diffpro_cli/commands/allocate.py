from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import DEFAULT_WORKDIR, Force, JsonOut, ModelArg, Quiet, TrustCode, Workdir
from diffpro_cli.errors import NotImplementedStage


def allocate_cmd(
    source: Annotated[Path, typer.Argument(help="Input artifact or config file.")] = Path("."),
    workdir: Workdir = DEFAULT_WORKDIR,
    force: Force = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Solve the per-layer bit allocation under a budget."""
    raise NotImplementedStage("allocate: not available yet (the bit allocator lands with issue #8); nothing was written")
