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
                  human="\n".join([f"{r['spec']:22s} {r['class']:24s} {'trained' if r['trained'] else 'UNTRAINED'}" for r in rows]
                                  + [f"random:{a:15s} {'random weights (speed and memory only)'}" for a in RANDOM_ARCHS if "tiny" not in a]))
        return
    from diffpro_cli.loading import is_quantized_checkpoint

    m = load_model(model, trust_code=trust_code, weights=weights)
    layers = m.quantizable_layers()
    desc = m.describe() | {"layers": [{"name": k, "role": r, "type": type(mod).__name__} for k, (mod, r) in layers.items()]}
    extra = ""
    if is_quantized_checkpoint(model):
        from diffpro_cli.checkpoint import read_meta

        meta = read_meta(model)
        desc["quantized"] = quantized_summary(meta)
        # integer weights (and int8 embedding tables) are buffers, not parameters: count what they stand for
        tables = (meta.get("embeddings") or {}).get("tables") or []
        buffers = dict(m.net.named_buffers())
        desc["params"] += desc["quantized"]["layer_params"] + sum(
            buffers[f"{t}.qweight"].numel() for t in tables if f"{t}.qweight" in buffers)
        extra = "\n" + quantized_lines(desc["quantized"])
    flags = " RANDOM WEIGHTS" if m.random_weights else (" UNTRAINED" if m.untrained else "")
    what = f"quantized {m.kind} from {desc['quantized']['source']}" if "quantized" in desc else m.kind
    ui.result(desc, human=f"{m.spec}: {what}, {desc['params'] / 1e6:.2f}M params, {len(layers)} quantizable layers, "
                          f"sample shape {tuple(m.sample_shape)}{flags}{extra}")


def quantized_summary(meta: dict) -> dict:
    """What a quantized checkpoint holds, from its diffpro.json: size, bits, per-layer execution, steps, cache."""
    from collections import Counter
    from math import prod

    layers = meta.get("layers") or {}
    kernels = Counter(str(rec.get("kernel", "?")) for rec in layers.values())
    totals = meta.get("totals") or {}
    ts = meta.get("timesteps") or []
    cache = meta.get("cache") or None
    prov = meta.get("provenance") or {}
    return {"source": (meta.get("model") or {}).get("spec", "?"), "avg_bits": totals.get("avg_bits"),
            "bytes": totals.get("bytes"), "fp32_bytes": totals.get("fp32_bytes"),
            "layer_params": sum(prod(rec.get("weight_shape") or [0]) + (rec["weight_shape"][0] if rec.get("bias") else 0)
                                for rec in layers.values()),
            "kernels": dict(sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))),
            "act_modes": sorted({str(rec.get("act_mode")) for rec in layers.values()}),
            "timesteps": len(ts), "timestep_range": [max(ts), min(ts)] if ts else None,
            "compute_dtype": meta.get("compute_dtype"),
            "cache": _cache_summary(cache),
            "diffpro_version": prov.get("diffpro_version"), "torch": prov.get("torch"), "created": prov.get("created")}


def _cache_summary(record: dict | None) -> dict | None:
    from diffpro_cli.cache import CacheSchedule, record_policy

    policy = record_policy(record)
    if policy is None:
        return None
    fraction = policy.compute_fraction() if isinstance(policy, CacheSchedule) else None
    return {"policy": type(policy).__name__, "compute_fraction": fraction}


def quantized_lines(q: dict) -> str:
    size = ""
    if q["bytes"] and q["fp32_bytes"]:
        size = f", {q['bytes'] / 1e6:.2f} MB ({q['fp32_bytes'] / q['bytes']:.2f}x smaller than fp32's {q['fp32_bytes'] / 1e6:.2f} MB)"
    bits = f"avg {q['avg_bits']:.2f} bits" if isinstance(q["avg_bits"], (int, float)) else "bits n/a"
    steps = (f"{q['timesteps']} timesteps ({q['timestep_range'][0]} … {q['timestep_range'][1]})" if q["timesteps"]
             else "no timestep subset (the sampler's own schedule)")
    cache = "none"
    if q["cache"]:
        fraction = q["cache"]["compute_fraction"]
        cache = q["cache"]["policy"] + (f", {fraction:.2f} of the block evaluations" if fraction is not None else "")
    dtype = q["compute_dtype"] or "float32"
    return "\n".join([f"  weights: {bits}{size}",
                      "  layers: " + ", ".join(f"{k} ×{n}" for k, n in q["kernels"].items()),
                      f"  steps: {steps}; activations: {', '.join(q['act_modes'])}; float math: {dtype}; cache: {cache}",
                      f"  made by diffpro {q['diffpro_version']} (torch {q['torch']}) at {q['created']}"])
