from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import DEFAULT_WORKDIR, Force, JsonOut, ModelArg, Quiet, TrustCode, Workdir
from diffpro_cli.errors import NotImplementedStage


def profile_cmd(
    model: ModelArg = "builtin:dit-mnist",
    workdir: Workdir = DEFAULT_WORKDIR,
    trust_code: TrustCode = False,
    force: Force = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Record per-layer, per-timestep activation statistics (calibration sampling)."""
    from diffpro_cli.models import load_model

    load_model(model, trust_code=trust_code)  # validate the spec before saying what is missing
    raise NotImplementedStage("profile: not available yet (the sensitivity profiler lands with issue #6); nothing was written")
