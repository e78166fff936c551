"""The pair-bound assumption across score → allocate → quantize (quant/pair_bound.py, `quantize --pair-bound`).

On a CPU without VNNI, quantize (pair bound auto) re-rounds 8-bit per-channel weights (round-to-nearest
or, with --rounding gptq, GPTQ: pair_bound.bounded_gptq) so that AVX2's int16 pair sums cannot saturate, and those layers then run on the 8-bit activation grid
instead of the 7-bit one. `score --measure` measures what such a layer will really be: the error of its
BOUNDED 8-bit weights (measured_error_pair_bounded, round-to-nearest: bounded GPTQ only lowers it, as
plain GPTQ does measured_error; measured_error keeps plain round-to-nearest, which is what the same
weights cost on float activations, where nothing is bounded) and its input error on
the grid the bounded layer's kernel uses. scores.json records the assumption; allocate prices with it
and writes it into plan.json; quantize says when it will run otherwise (pair_bound_note).
"""

from __future__ import annotations

import torch

RULE = ("8-bit per-channel weights of layers on integer activations (Linear, Conv2d without groups) re-rounded "
        "so that AVX2's int16 pair sums cannot saturate (layers.bound_pairs; GPTQ rounding bounded as it rounds); "
        "they run on the 8-bit activation grid. Not bounded: other widths, group-wise scales, float activations")


def pair_bound_record(setting: str, device: str = "cpu") -> dict | None:
    """scores.json's record of the assumption; None on a VNNI CPU or a GPU that does not bound (one grid,
    nothing to record: those scores stay as they were)."""
    from diffpro_cli.quant.kernels import cpu_has_vnni
    from diffpro_cli.stages.quantize import wants_pair_bound

    assumed, vnni = wants_pair_bound(setting, device), cpu_has_vnni()
    if (vnni or str(device).startswith("cuda")) and not assumed:
        return None
    return {"setting": setting, "assumed": assumed, "cpu_vnni": vnni, "rule": RULE}


@torch.no_grad()
def measure_pair_bounded_errors(model, names: list[str], x, t, y, act_errors: dict[str, dict[str, float]],
                                act_mode: str = "dynamic", batch: int = 16, advance=lambda n=1: None,
                                reference=None) -> dict[str, float]:
    """For each named layer the bound covers (pair_bound.bound_covers): the relative eps error with its
    weights pair-bounded at 8 bits (returned, name → error), and, added to `act_errors[name]` under its
    grid's key, the error of its input quantised as the bounded layer's kernel does ("8": the ±127 grid).
    A key already measured (the 4-bit probe of measure_act_errors runs the same kernel on the same grid)
    is not measured twice. `reference`: score_errors.reference_eps of these inputs, when the caller has it."""
    from diffpro_cli.quant.layers import quantize_module
    from diffpro_cli.quant.pair_bound import bound_covers, pair_bounded_weight
    from diffpro_cli.stages.score_errors import _act_error, error_with_weight, kernel_grid, reference_eps

    layers = model.quantizable_layers()
    reference = reference or reference_eps(model, x, t, y, batch)
    mode = "dynamic" if act_mode == "static" else act_mode
    result = {}
    for name in names:
        mod = layers[name][0]
        if not bound_covers(mod):
            continue
        w = mod.weight.data
        result[name] = error_with_weight(model, mod, pair_bounded_weight(w).to(w.device), x, t, y, reference, batch)
        probe = quantize_module(mod, 8, act_bits=8, act_mode=mode)
        probe.bound_pairs(mod.weight)
        probe.prepare(mod.weight.device)   # re-made for the bounded integers, on the device quantize_module used
        key, scheme, qmax, reduce_range = kernel_grid(probe)
        if key not in act_errors.setdefault(name, {}):
            act_errors[name][key] = _act_error(model, mod, x, t, y, reference, batch, scheme, qmax, reduce_range)
        advance(1)
    return result


def bounded_layers_of_plan(plan: dict, model) -> list[str]:
    """The layers of `plan` that quantize's pair bound covers, whatever the rounding (GPTQ is bounded
    too). Mirrors checkpoint.plan_layer + layers.bound_pairs."""
    from diffpro_cli.quant.pair_bound import bound_applies, bound_covers

    modules = model.quantizable_layers()
    return [n for n, e in plan.get("layers", {}).items()
            if bound_applies(e.get("weight_bits", 16), e.get("group_size"), int(e.get("act_bits", 8)) >= 16 or e.get("act_mode") == "none")
            and n in modules and bound_covers(modules[n][0])]


def pair_bound_note(plan: dict, model, pair_bound: str) -> tuple[str, str] | None:
    """("warn" | "info", one line) when the plan was priced under another pair-bound assumption than
    this quantize run applies; None when they agree (always on a VNNI CPU with default settings)."""
    from diffpro_cli.devices import net_device
    from diffpro_cli.quant.kernels import cpu_has_vnni
    from diffpro_cli.stages.quantize import wants_pair_bound

    covered = bounded_layers_of_plan(plan, model)
    if not covered:
        return None
    assumed = bool((plan.get("pair_bound") or {}).get("assumed"))
    applies = wants_pair_bound(pair_bound, str(net_device(model.net)))
    if assumed and not applies:
        why = f"--pair-bound {pair_bound}" + (" (this CPU has VNNI)" if pair_bound == "auto" else "")
        grid = "the 7-bit activation grid" if not cpu_has_vnni() else "the 8-bit grid (this CPU has VNNI)"
        return "warn", (f"quantize: the plan priced {len(covered)} 8-bit layers as pair-bounded (8-bit activations without VNNI), "
                        f"but {why} leaves all {len(covered)} of them unbounded, on {grid}: their error differs from the "
                        f"plan's prediction; re-run `diffpro score --measure --pair-bound off` and allocate to price that")
    if not assumed and applies:
        return "info", (f"quantize: the plan priced {len(covered)} 8-bit layers without a pair bound (7-bit activations without "
                        f"VNNI); this run bounds {len(covered)} of them (--pair-bound {pair_bound}) and runs "
                        f"them on the 8-bit grid: re-run `diffpro score --measure` and allocate to price that")
    return None
