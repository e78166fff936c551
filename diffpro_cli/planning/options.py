"""Planning inputs: budgets, per-layer options (stored weight bits x execution path) and layers from scores.json.

An option pairs what is STORED (weight bits: the checkpoint's size) with how it RUNS (activation bits:
8 = the integer kernel with dynamic int8 activations, 16 = float compute from the stored low-bit
weights). The two are separate choices (issue #19): a 4-bit layer whose integer kernel is slower than
float on this machine is stored at 4 bits and computed in float.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from diffpro_cli.errors import InputError, UsageError

WEIGHT_BITS = (2, 3, 4, 6, 8, 16)
ACT_BITS = (8, 16)
ACT_MODES = ("dynamic", "static")
BUDGET_KINDS = ("avg-bits", "size-mb", "latency-ms", "latency")
DEFAULT_PROTECT = ("patch_embed", "time_embed", "class_embed", "context_embed", "adaln", "final")
# Roles whose activations stay float (stored low-bit weights, float compute) when 16 is an execution path.
# The patch embedding reads x_t itself (8-bit rounding blurs the noise the model must predict) and the final
# projection writes the prediction; both are tiny. Measured on builtin:dit-mnist, W8A8, 32 samples x 50
# steps, PSNR vs fp32 (docs/quantization.md): VNNI 38.2 -> 40.8 dB, AVX2 7-bit grid 30.2 -> 38.8 dB;
# builtin:unet-mnist VNNI 39.9 -> 42.8 dB, AVX2 33.2 -> 39.4 dB. Per-token scales did not help (38.0 dB).
FLOAT_ACT_ROLES = ("patch_embed", "final")
METHODS = ("milp", "cdf")
LATENCY_SOURCES = ("measured", "analytic")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """One budget: avg-bits=B, size-mb=M, latency-ms=T (per step and image), latency=F (fraction of the
    fp32 full-schedule latency per image; chooses the step count jointly)."""
    kind, sep, value = text.partition("=")
    kind = kind.strip().lower()
    try:   # Python's float takes "6_0" as 60: a typo there must not become a ten times larger budget
        number = float(value) if "_" not in value else float("nan")
    except ValueError:
        number = float("nan")
    if not sep or kind not in BUDGET_KINDS or not math.isfinite(number) or number <= 0 or (kind == "latency" and number > 1):
        raise UsageError(f"--budget {text!r}: use avg-bits=5.0, size-mb=3.5, latency-ms=2.0 or latency=0.4 "
                         f"(a positive number; latency= is a fraction ≤ 1 of the fp32 full schedule), comma-separated to combine")
    return Budget(kind, number)


def parse_budgets(text: str | None) -> list[Budget]:
    """A comma list of budgets, each kind at most once (e.g. "avg-bits=4.4,latency=0.4")."""
    if not text:
        return []
    budgets = [parse_budget(part) for part in text.split(",") if part.strip()]
    kinds = [b.kind for b in budgets]
    if len(set(kinds)) != len(kinds):
        raise UsageError(f"--budget {text!r}: each kind at most once")
    return budgets


def canonical_budgets(text: str | None) -> str | None:
    """The budget list in one spelling (kinds sorted, lower case, exact values), so the lock sees that
    "avg-bits=6 " and "AVG-BITS=6.0" are the budget it already planned for."""
    budgets = sorted(parse_budgets(text), key=lambda b: b.kind)
    return ",".join(f"{b.kind}={b.value!r}" for b in budgets) or None


@dataclass(frozen=True)
class Option:
    weight_bits: int
    act_bits: int
    act_mode: str
    group_size: int | None

    @property
    def full_precision(self) -> bool:
        return self.weight_bits >= 16

    def label(self) -> str:
        if self.full_precision:
            return "fp32"
        g = f"g{self.group_size}" if self.group_size else ""
        a = f"a{self.act_bits}{self.act_mode[0]}" if self.act_bits < 16 else "a16"
        return f"w{self.weight_bits}{g}{a}"


def make_options(bits: list[int], act_bits: list[int], act_mode: str, group_size: int | None) -> list[Option]:
    """Every weight × activation combination; 16-bit weights only with float activations (no quantization)."""
    bad = [b for b in bits if b not in WEIGHT_BITS]
    if bad or not bits:
        raise UsageError(f"--bits {bits}: choose from {','.join(map(str, WEIGHT_BITS))} (16 = keep in full precision)")
    if not act_bits or any(a not in ACT_BITS for a in act_bits):
        raise UsageError(f"--act-bits {act_bits}: choose from 8,16 (16 = float activations, weight-only)")
    if act_mode not in ACT_MODES:
        raise UsageError(f"--act-mode {act_mode}: use dynamic or static")
    if group_size is not None and group_size < 1:
        raise UsageError(f"--group-size {group_size}: must be a positive integer (omit for per-channel scales)")
    options = [Option(w, a, act_mode, group_size) for w in sorted(set(bits)) if w < 16 for a in sorted(set(act_bits))]
    if 16 in bits:
        options.append(Option(16, 16, act_mode, None))
    return options


@dataclass
class Layer:
    name: str
    role: str
    kind: str
    in_features: int
    out_features: int
    params: int
    macs: int
    score: float
    cdf: float
    measured: dict[int, float]
    proxy: float | None = None     # log10 predicted relative output error at the score's proxy bits
    taylor: dict[int, float] = field(default_factory=dict)   # first-order error estimates per bit width
    measured_act: dict[int, float] = field(default_factory=dict)   # measured error with only the inputs quantized
    # measured error at 8 bits of the weights quantize's pair bound stores (score on a CPU without VNNI;
    # stages/pair_bound_assumption.py): present = the bound covers this layer's 8-bit per-channel weights
    measured_pair_bounded: dict[int, float] = field(default_factory=dict)

    @property
    def weight_numel(self) -> int:
        w = self.in_features * self.out_features
        return w if w <= self.params else self.params

    @property
    def bias_numel(self) -> int:
        return self.params - self.weight_numel

    def tokens(self, default: int | None) -> int | None:
        """Rows of the layer's GEMM per image and forward: MACs / weight elements, else --tokens."""
        if self.macs and self.macs > 0:
            return max(1, round(self.macs / self.weight_numel))
        return default


def _count(d: dict, key: str, least: int, default=None) -> int:
    value = d.get(key, default) if default is not None else d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or int(value) < least:
        raise ValueError(f"{key} ({value!r}: an integer of at least {least})")
    return int(value)


def _errors(d: dict, key: str) -> dict[int, float]:
    """A {bits: relative error} map of scores.json; a NaN, infinite or negative error would make the
    solver fail (NaN) or pick the layer as if quantizing it removed error (negative)."""
    raw = d.get(key) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{key} ({type(raw).__name__}: a map of bit width to error)")
    out = {}
    for k, v in raw.items():
        if v is None:
            continue
        try:
            bits, error = int(k), float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{key} ({k!r}: {v!r}: a bit width and a number)") from None
        if not (math.isfinite(error) and error >= 0):
            raise ValueError(f"{key} ({bits} bits: {error!r}: a finite error of at least 0)")
        out[bits] = error
    return out


def _number(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} ({value!r}: a number)") from None


def load_layers(scores: dict, path: str | Path = "scores.json") -> list[Layer]:
    """scores.json's layers, each field checked: a hand-edited or damaged file is one InputError naming the
    layer and the field, not a solver traceback or a plan priced on a negative or NaN error."""
    layers = []
    raw = scores.get("layers") if isinstance(scores, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: has no layers; re-run `diffpro score`")
    for name, d in raw.items():
        try:
            if not isinstance(d, dict):
                raise ValueError(f"entry ({type(d).__name__}: a JSON object)")
            cdf = _number(d, "cdf", 0.5)
            if not 0 <= cdf <= 1:   # a fraction of layers; the cdf error model prices with it (NaN: a solver traceback)
                raise ValueError(f"cdf ({cdf!r}: a fraction from 0 to 1)")
            proxy = d.get("output_error_proxy")
            if proxy is not None:
                proxy = _number(d, "output_error_proxy", 0.0)
                if not math.isfinite(proxy):
                    raise ValueError(f"output_error_proxy ({proxy!r}: a finite log10 error)")
            layers.append(Layer(
                name=name, role=str(d.get("role") or "other"), kind=str(d.get("kind") or "Linear"),
                in_features=_count(d, "in_features", 1), out_features=_count(d, "out_features", 1),
                params=_count(d, "params", 1), macs=_count(d, "macs", 0, default=0) if d.get("macs") is not None else 0,
                score=_number(d, "combined_score", 0.0), cdf=cdf,
                measured=_errors(d, "measured_error"), proxy=proxy, taylor=_errors(d, "taylor_error"),
                measured_act=_errors(d, "measured_act_error"),
                measured_pair_bounded=_errors(d, "measured_error_pair_bounded")))
        except KeyError as exc:
            raise InputError(f"{path}: layer {name} has no {exc.args[0]}; re-run `diffpro score`") from None
        except ValueError as exc:
            raise InputError(f"{path}: layer {name} has an invalid {exc}; re-run `diffpro score`") from None
    return layers


# ---------------------------------------------------------------------------------------------
# Cost model: size, error
# ---------------------------------------------------------------------------------------------


def effective_option(layer: Layer, opt: Option) -> Option:
    """The option as this layer runs it: a --group-size that does not divide the layer's input width
    (e.g. a DiT's 16-wide patch embedding with groups of 64) falls back to per-channel scales for that
    layer instead of ruling the option out, so one odd layer does not force the whole plan up."""
    if opt.group_size and not opt.full_precision and layer.in_features % opt.group_size:
        return dataclasses.replace(opt, group_size=None)
    return opt


def option_bits(layer: Layer, opt: Option) -> int:
    """Storage of the layer in bits under `opt` (exact integer), as the checkpoint stores it
    (quant/formats.py): packed integer weights, fp16 scales [out, groups], fp32 bias."""
    from diffpro_cli.quant.formats import packed_numel

    if opt.full_precision:
        return 32 * layer.params
    groups = math.ceil(layer.in_features / opt.group_size) if opt.group_size else 1
    scales = layer.out_features * groups
    return 8 * packed_numel(layer.weight_numel, opt.weight_bits) + 16 * scales + 32 * layer.bias_numel

