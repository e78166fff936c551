from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import JsonOut, Quiet
from diffpro_cli.errors import NotImplementedStage


def fid_stats_cmd(
    images: Annotated[str, typer.Argument(help="Image folder or builtin:mnist.")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz with mu/sigma.")] = Path("stats.npz"),
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Compute pytorch-fid reference statistics (mu, sigma) for an image folder or built-in dataset."""
    raise NotImplementedStage("fid-stats: not available yet (offline FID lands with issue #5); nothing was written")
