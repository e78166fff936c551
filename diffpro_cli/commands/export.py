from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import JsonOut, Quiet, TrustCode, make_ui
from diffpro_cli.errors import UsageError


def export_cmd(
    quantized: Annotated[Path, typer.Argument(help="A diffpro quantized checkpoint directory (from `diffpro quantize`).")],
    out: Annotated[Path, typer.Argument(help="Folder to write (must be new or empty unless --force).")],
    to: Annotated[str, typer.Option("--to", help="diffusers (model folder with quantization_config; load with diffpro.load) or torchao (float weights + FqnToConfig mapping).")] = "diffusers",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT.")] = False,
    trust_code: TrustCode = False,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Export a quantized checkpoint where users serve: a diffusers model folder, or torchao's format."""
    from diffpro_cli.export import TARGETS, export_diffusers, export_torchao

    ui = make_ui(quiet, json_output)
    if to not in TARGETS:
        raise UsageError(f"--to {to}: choose {' or '.join(TARGETS)}")
    if to == "diffusers":
        config = export_diffusers(quantized, out, force=force)
        layers = config["quantization_config"]["layers"]
        ui.result({"out": str(out), "to": to, "class": config["_class_name"], "layers": len(layers)},
                  human=f"{out}: diffusers {config['_class_name']} folder, {len(layers)} quantized layers "
                        f"(load with diffpro.load('{out}'))")
    else:
        doc = export_torchao(quantized, out, force=force, trust_code=trust_code)
        ui.result({"out": str(out), "to": to, "configs": len(doc["fqn_to_config"]), "skipped": doc["skipped"]},
                  human=f"{out}: float weights + torchao configs for {len(doc['fqn_to_config'])} layers"
                        + (f", {len(doc['skipped'])} stay float (see torchao_config.json 'skipped')" if doc["skipped"] else ""))
