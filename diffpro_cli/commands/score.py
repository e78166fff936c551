from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import parse_int_list, stage_command


@stage_command
def score_cmd(
    ctx,
    profile: Annotated[Optional[Path], typer.Argument(help="Profile directory or its profile.json (default WORKDIR/profile).")] = None,
    formula: Annotated[str, typer.Option("--formula", help="diffpro (the paper's combined score) or taylor (first-order output error; loads the model).")] = "diffpro",
    pca_metric: Annotated[str, typer.Option("--pca-metric", help="PCA sensitivity from the spectrum: erank, top1 or participation.")] = "erank",
    variance: Annotated[float, typer.Option("--variance", help="Explained-variance fraction behind k95.")] = 0.95,
    component_weights: Annotated[str, typer.Option("--component-weights", help="Weights of the z-scored components, e.g. pca=1,energy=1,k95=-1,range=1.")] = "",
    normalize: Annotated[str, typer.Option("--normalize", help="Scale of the components before weighting: zscore or rank.")] = "zscore",
    measure: Annotated[bool, typer.Option("--measure", help="Quantise one layer at a time and report Spearman rho of every signal vs the measured error.")] = False,
    taylor: Annotated[bool, typer.Option("--taylor", help="Also estimate each layer's quantised-output error (first order; loads the model).")] = False,
    bits: Annotated[str, typer.Option("--bits", help="Weight bit widths to measure / estimate.")] = "4,8",
    model: Annotated[Optional[str], typer.Option("--model", help="Model for --measure / taylor (default: the profiled one).")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Profile samples regenerated for --measure / taylor.")] = 4,
    calib_timesteps: Annotated[int, typer.Option("--calib-timesteps", help="Profile timesteps (evenly spread) used for --measure / taylor.")] = 8,
    probes: Annotated[int, typer.Option("--probes", help="Random probes per batch of the taylor estimate.")] = 2,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Weight quantisation group size (default per output channel).")] = None,
    act_mode: Annotated[str, typer.Option("--act-mode", help="--measure: activation mode whose 8-bit input error is measured per layer (dynamic, dynamic-token, static).")] = "dynamic",
    pair_bound: Annotated[str, typer.Option("--pair-bound", help="--measure: the quantize --pair-bound to measure for (auto, on, off): where it bounds 8-bit weights (auto: CPUs without VNNI), their 8-bit error is also measured bounded and allocate prices those layers on the 8-bit activation grid.")] = "auto",
    layer: Annotated[Optional[str], typer.Option("--layer", help="Layer shown in the activation-over-timesteps figure (default the top-ranked).")] = None,
    top: Annotated[int, typer.Option("--top", help="Layers drawn in the PCA spectra figure.")] = 8,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures to WORKDIR/figures.")] = True,
):
    """Compute manifold-aware layer sensitivity scores from a profile (WORKDIR/scores.json)."""
    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.score import ScoreConfig, parse_weights, run_score

    ui = ctx.ui
    cfg = ScoreConfig(formula=formula, pca_metric=pca_metric, variance=variance, weights=parse_weights(component_weights),
                      bits=parse_int_list(bits, "--bits"), measure=measure, taylor=taylor, calib_samples=calib_samples, calib_timesteps=calib_timesteps,
                      probes=probes, normalize=normalize, group_size=group_size, act_mode=act_mode, pair_bound=pair_bound, figures=figures,
                      figure_layer=layer, top=top)
    result = run_score(ctx, cfg, profile_path=profile)
    outcome, out = result.outcome, result.value
    doc = read_json(out, "diffpro.scores/1")
    payload = outcome.as_dict() | {"scores": str(out), "formula": doc["formula"], "layers": len(doc["layers"])}
    human = f"score: {outcome.status} ({outcome.wall_s:.1f}s) -> {out}"
    top_layers = sorted(doc["layers"], key=lambda n: doc["layers"][n]["rank"])[:5]
    human += "\n  most sensitive: " + ", ".join(top_layers)
    if "validation" in doc:
        sp = doc["validation"]["spearman"]
        payload["spearman"] = {b: {k: v["rho"] for k, v in row.items()} for b, row in sp.items()}
        for b, row in sp.items():
            human += f"\n  Spearman vs measured {b}-bit error: " + ", ".join(f"{k} {v['rho']}" for k, v in row.items())
    if doc["model"].get("untrained") or doc["model"].get("random_weights"):
        human += "\n  note: the model is untrained / random; its sensitivities say nothing about a trained network"
    ui.result(payload, human=human)
