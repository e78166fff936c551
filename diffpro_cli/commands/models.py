from __future__ import annotations

from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import JsonOut, Quiet, TrustCode, Weights, make_ui


def models_cmd(
    model: Annotated[Optional[str], typer.Argument(help="Describe this model spec; without it, list the built-ins.")] = None,
    trust_code: TrustCode = False,
    weights: Weights = None,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """List the built-in models, or describe one model spec (layers, roles, parameters)."""
    from diffpro_cli.loading import load_model
    from diffpro_cli.models.builtin import BUILTIN_CONFIGS, weights_path
    from diffpro_cli.models.random_arch import RANDOM_ARCHS

    ui = make_ui(quiet, json_output)
    if model is None:
        rows = [{"spec": f"builtin:{k}", "class": v["class"], "trained": weights_path(k).exists()} for k, v in BUILTIN_CONFIGS.items()]
        ui.result({"builtin": rows, "random": [f"random:{a}" for a in RANDOM_ARCHS if "tiny" not in a]},
                  human="\n".join(f"{r['spec']:22s} {r['class']:24s} {'trained' if r['trained'] else 'UNTRAINED'}" for r in rows))
        return
    m = load_model(model, trust_code=trust_code, weights=weights)
    layers = m.quantizable_layers()
    desc = m.describe() | {"layers": [{"name": k, "role": r, "type": type(mod).__name__} for k, (mod, r) in layers.items()]}
    flags = " RANDOM WEIGHTS" if m.random_weights else (" UNTRAINED" if m.untrained else "")
    ui.result(desc, human=f"{m.spec}: {m.kind}, {desc['params'] / 1e6:.2f}M params, {len(layers)} quantizable layers, "
                          f"sample shape {tuple(m.sample_shape)}{flags}")
