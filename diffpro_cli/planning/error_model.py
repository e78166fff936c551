"""Predicted quantization error of a layer under an option: measured single-layer errors where
`score --measure` ran, else first-order or score-based proxies (docs/planning.md)."""

from __future__ import annotations

import math
from typing import Callable

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.planning.options import Layer, Option, effective_option

ERROR_MODELS = ("auto", "measured", "taylor", "proxy", "score", "cdf")


def measured_at(measured: dict[int, float], bits: int) -> float:
    """Measured error at `bits`: exact when measured, log-linear between two measured widths,
    else the nearest measured width × 4^-Δbits."""
    if bits in measured:
        return measured[bits]
    lower = [b for b in measured if b < bits]
    upper = [b for b in measured if b > bits]
    if lower and upper and measured[max(lower)] > 0 and measured[min(upper)] > 0:
        lo, hi = max(lower), min(upper)
        w = (bits - lo) / (hi - lo)
        return math.exp((1 - w) * math.log(measured[lo]) + w * math.log(measured[hi]))
    b0 = min(measured, key=lambda b: (abs(b - bits), -b))
    return measured[b0] * 4.0 ** (b0 - bits)


def pair_bounded(layer: Layer, weight_bits: int, group_size: int | None) -> bool:
    """Whether quantize's pair bound covers this layer's integer option: its scores carry the bounded
    8-bit measurement (score assumed the bound and it covers the layer: stages/pair_bound_assumption.py)
    and the option is one the bound applies to (pair_bound.bound_applies; integer activations are the
    caller's case)."""
    from diffpro_cli.quant.pair_bound import bound_applies

    return bool(layer.measured_pair_bounded) and bound_applies(weight_bits, group_size or None, float_activations=False)


def error_model(layers: list[Layer], choice: str = "auto", proxy_bits: int = 4) -> tuple[str, Callable[..., float]]:
    """E(layer, bits): predicted error of quantizing one tensor of the layer (weights or inputs) to `bits`.

    Sources, best first (auto takes the first one that EVERY layer has, so units never mix):
      measured  measured_error from `score --measure` (relative MSE of the noise prediction with this
                layer's weights fake-quantized); widths between two measured ones log-linearly
                interpolated, others extrapolated from the nearest measured width as × 4^-Δbits
                (quantization noise power falls 4× per extra bit);
      taylor    taylor_error from `score --taylor` (first-order estimate of the same quantity), per
                width, interpolated and extrapolated the same way;
      proxy     10^output_error_proxy (the layer's predicted relative output error at the score's
                proxy width) × 4^(proxy_bits - bits);
      score     combined_score × 4^-bits (only when every score is positive);
      cdf       the score's CDF × 4^-bits (rank-based, always positive).
    E(layer, bits, pair_bounded=True): with measured errors, the 8-bit error of the pair-bounded weights
    where score measured it (measured_error_pair_bounded); the other models have no such measurement.
    """
    have = {
        "measured": all(l.measured for l in layers),
        "taylor": all(l.taylor for l in layers),
        "proxy": all(l.proxy is not None for l in layers),
        "score": all(l.score > 0 for l in layers),
        "cdf": True,
    }
    if choice == "auto":
        choice = next(k for k in ERROR_MODELS[1:] if have[k])
    elif choice not in have:
        raise UsageError(f"--error-model {choice}: use one of {', '.join(ERROR_MODELS)}")
    elif not have[choice]:
        fix = {"measured": "re-run `diffpro score --measure`", "taylor": "re-run `diffpro score --taylor`",
               "proxy": "re-run `diffpro score --taylor`",
               "score": "the combined scores are not all positive; use --error-model cdf"}[choice]
        raise InputError(f"--error-model {choice}: not every layer in scores.json has it; {fix} or pass --error-model auto")

    def bit_error(layer: Layer, bits: int, pair_bounded: bool = False) -> float:
        if bits >= 16:
            return 0.0
        if pair_bounded and choice == "measured" and bits in layer.measured_pair_bounded:
            return layer.measured_pair_bounded[bits]
        if choice in ("measured", "taylor"):
            return measured_at(layer.measured if choice == "measured" else layer.taylor, bits)
        if choice == "proxy":
            return 10.0 ** layer.proxy * 4.0 ** (proxy_bits - bits)
        return (layer.score if choice == "score" else layer.cdf) * 4.0 ** (-bits)

    names = {"measured": "measured_error (log-interpolated; outside: × 4^-Δbits)",
             "taylor": "taylor_error (log-interpolated; outside: × 4^-Δbits)", "proxy": f"10^output_error_proxy × 4^({proxy_bits} - bits)",
             "score": "combined_score × 4^-bits", "cdf": "cdf × 4^-bits"}
    return names[choice], bit_error


def activation_error_model(layers: list[Layer], weight_model: str, bit_error) -> tuple[str, Callable[[Layer, int, int], float]]:
    """A(layer, act_bits, weight_bits): predicted error of quantizing the layer's inputs. With measured
    weight errors and a measured_act_error for every layer (`score --measure`), the measured one, in the
    same units, on the grid this CPU's kernels really use (kernels.cpu_act_qmax): without VNNI the
    inputs get a 7-bit grid, so 8-bit activations cost the "7" measurement (or the "8" one × 4 when
    only that was measured), except on layers quantize's pair bound covers (`pair_bounded`: 8-bit
    per-channel weights re-rounded so the 8-bit grid cannot saturate), which cost the "8" one. Otherwise the weight curve stands in (E(layer, act_bits)),
    which misjudges layers whose inputs are hard to quantize but whose weights are not, like a patch
    embedding fed x_t itself."""
    if weight_model.startswith("measured") and all(l.measured_act for l in layers):
        from diffpro_cli.quant.kernels import act_bits_of, cpu_act_qmax

        def measured_act(layer: Layer, act_bits: int, weight_bits: int, group_size: int | None = None) -> float:
            if act_bits >= 16:
                return 0.0
            # act_bits is 8 here (ACT_BITS); the grid depends on the weights the GEMM multiplies
            grid = cpu_act_qmax(weight_bits, group_size, pair_bounded(layer, weight_bits, group_size))
            return measured_at(layer.measured_act, act_bits_of(grid))

        bounded = " (pair-bounded 8-bit weights: the 8-bit grid)" if any(l.measured_pair_bounded for l in layers) else ""
        return f"measured_act_error on this CPU's kernel grid{bounded} (outside: × 4^-Δbits)", measured_act
    return "as the weights' E(layer, bits)", lambda layer, act_bits, weight_bits, group_size=None: bit_error(layer, act_bits)


def option_error(bit_error, act_error, layer: Layer, opt: Option) -> float:
    """Weight error + activation error of one layer under `opt` (the two add, to first order). On float
    activations nothing is pair-bounded: those options keep the plain weight error."""
    if opt.full_precision:
        return 0.0
    if opt.act_bits >= 16:
        return bit_error(layer, opt.weight_bits)
    bounded = pair_bounded(layer, opt.weight_bits, opt.group_size)
    return bit_error(layer, opt.weight_bits, bounded) + act_error(layer, opt.act_bits, opt.weight_bits, opt.group_size)



def plan_pair_bound(record: dict | None, layers: list[Layer], options: list[Option], choice: list[int]) -> dict | None:
    """plan.json's record of the pair-bound assumption its errors were priced with: scores.json's record
    (None, as there, on a VNNI CPU that does not bound) and how many chosen layers were priced bounded."""
    if record is None:
        return None
    priced = [l.name for l, j in zip(layers, choice)
              if (o := effective_option(l, options[j])) and not o.full_precision and o.act_bits < 16 and pair_bounded(l, o.weight_bits, o.group_size)]
    return {**record, "source": "scores.json", "priced_bounded_layers": len(priced)}
