from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import DEFAULT_WORKDIR, Force, JsonOut, ModelArg, Quiet, TrustCode, Workdir
from diffpro_cli.errors import NotImplementedStage


def run_cmd(
    source: Annotated[Path, typer.Argument(help="Input artifact or config file.")] = Path("."),
    workdir: Workdir = DEFAULT_WORKDIR,
    force: Force = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Run the whole pipeline from one TOML config, skipping up-to-date stages."""
    raise NotImplementedStage("run: not available yet (the end-to-end runner lands with issue #9); nothing was written")
