"""Per-layer bit allocation under a budget, solved exactly as a mixed-integer program (docs/planning.md).

The cost table has one row per quantizable layer (from scores.json) and one column per option
(weight bits × activation bits). Each cell carries:
- size in bits: weight elements × bits + fp32 scales (per output channel, or per group) + fp32 bias;
  a 16-bit option means "kept in full precision" and is counted at 32 bits (fp32);
- predicted error: measured single-layer error when `score --measure` ran (other bit widths
  extrapolated as error ∝ 4^-bits), else the combined score × 4^-bits; activation quantization at a
  bits adds the same per-bit term E(a); full precision adds nothing;
- latency: the layer's forward at its real input shape, MEASURED with the integer kernels of
  `diffpro_cli.quant.layers` on this machine (cached in WORKDIR/cost_table.json).
The MILP picks exactly one option per layer (one-hot binaries), keeps every budget row, and minimises
the summed predicted error. `--method cdf` is the paper's rank/CDF-threshold rule, for comparison.
The joint plan sweeps step counts: total latency = steps × (Σ chosen layer latencies + non-GEMM
remainder), predicted quality = drift(steps) + quant_weight × quantization error.
"""

from __future__ import annotations

import dataclasses

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import BudgetError, InputError, UsageError

PLAN_SCHEMA = "diffpro.plan/1"
SCORES_SCHEMA = "diffpro.scores/1"
TIMESTEPS_SCHEMA = "diffpro.timesteps/1"
COST_SCHEMA = "diffpro.cost_table/1"
PARETO_SCHEMA = "diffpro.pareto/1"
WEIGHT_BITS = (2, 3, 4, 6, 8, 16)
ACT_BITS = (8, 16)
ACT_MODES = ("dynamic", "static")
BUDGET_KINDS = ("avg-bits", "size-mb", "latency-ms")
DEFAULT_PROTECT = ("patch_embed", "time_embed", "class_embed", "adaln", "final")
METHODS = ("milp", "cdf")
LATENCY_SOURCES = ("measured", "analytic")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class AllocateConfig:
    budget: str | None = None            # "avg-bits=5.0" | "size-mb=3" | "latency-ms=2.5" (per step, batch 1)
    bits: list[int] = field(default_factory=lambda: [4, 8, 16])
    act_bits: list[int] = field(default_factory=lambda: [8])   # DAQ on every quantized layer (see docs/planning.md)
    act_mode: str = "dynamic"
    group_size: int | None = None
    method: str = "milp"
    protect: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECT))
    protect_bits: int = 8
    latency_budget: float | None = None  # joint plan: total ms per image over all steps
    min_speedup: float | None = None     # per-step latency ≤ the fp32 step's / this (measured kernels, same run)
    steps: str | None = None             # joint plan: "auto" (the artifact's sweep) or a step count
    quant_weight: float = 1.0            # joint plan: units of quantization error per unit of drift
    tokens: int | None = None            # tokens per image when scores.json has no MACs
    latency_source: str = "measured"     # measured (real kernels) | analytic (labelled estimate)
    repeats: int = 5
    remainder_ms: float | None = None    # non-GEMM time per step; None → measured from the model
    pareto: bool = False
    time_limit: float = 60.0
    error_model: str = "auto"            # auto | measured | proxy | score | cdf (see error_model())

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    kind, sep, value = text.partition("=")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or kind not in BUDGET_KINDS or not math.isfinite(number) or number <= 0:
        raise UsageError(f"--budget {text!r}: use avg-bits=5.0, size-mb=3.5 or latency-ms=2.0 (a positive number)")
    return Budget(kind, number)


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


def load_layers(scores: dict, path: str | Path = "scores.json") -> list[Layer]:
    layers = []
    raw = scores.get("layers")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: has no layers; re-run `diffpro score`")
    for name, d in raw.items():
        try:
            layers.append(Layer(
                name=name, role=str(d.get("role", "other")), kind=str(d.get("kind", "Linear")),
                in_features=int(d["in_features"]), out_features=int(d["out_features"]), params=int(d["params"]),
                macs=int(d.get("macs") or 0), score=float(d.get("combined_score", 0.0)), cdf=float(d.get("cdf", 0.5)),
                measured={int(k): float(v) for k, v in (d.get("measured_error") or {}).items() if v is not None},
                proxy=float(d["output_error_proxy"]) if d.get("output_error_proxy") is not None else None,
                taylor={int(k): float(v) for k, v in (d.get("taylor_error") or {}).items() if v is not None},
                measured_act={int(k): float(v) for k, v in (d.get("measured_act_error") or {}).items() if v is not None}))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: layer {name} lacks a valid {exc}; re-run `diffpro score`") from None
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
    (quant/formats.py): packed integer weights, fp32 scales [out, groups], fp32 bias."""
    from diffpro_cli.quant.formats import packed_numel

    if opt.full_precision:
        return 32 * layer.params
    groups = math.ceil(layer.in_features / opt.group_size) if opt.group_size else 1
    scales = layer.out_features * groups
    return 8 * packed_numel(layer.weight_numel, opt.weight_bits) + 32 * scales + 32 * layer.bias_numel


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


def error_model(layers: list[Layer], choice: str = "auto", proxy_bits: int = 4) -> tuple[str, Callable[[Layer, int], float]]:
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

    def bit_error(layer: Layer, bits: int) -> float:
        if bits >= 16:
            return 0.0
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
    only that was measured). Otherwise the weight curve stands in (E(layer, act_bits)),
    which misjudges layers whose inputs are hard to quantize but whose weights are not, like a patch
    embedding fed x_t itself."""
    if weight_model.startswith("measured") and all(l.measured_act for l in layers):
        from diffpro_cli.quant.kernels import act_bits_of, cpu_act_qmax

        def measured_act(layer: Layer, act_bits: int, weight_bits: int) -> float:
            if act_bits >= 16:
                return 0.0
            return measured_at(layer.measured_act, act_bits_of(cpu_act_qmax(weight_bits)))   # act_bits is 8 here (ACT_BITS)

        return "measured_act_error on this CPU's kernel grid (outside: × 4^-Δbits)", measured_act
    return "as the weights' E(layer, bits)", lambda layer, act_bits, weight_bits: bit_error(layer, act_bits)


def option_error(bit_error, act_error, layer: Layer, opt: Option) -> float:
    """Weight error + activation error of one layer under `opt` (the two add, to first order)."""
    if opt.full_precision:
        return 0.0
    return bit_error(layer, opt.weight_bits) + (act_error(layer, opt.act_bits, opt.weight_bits) if opt.act_bits < 16 else 0.0)


# ---------------------------------------------------------------------------------------------
# Cost model: latency (measured with the real kernels, cached)
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key() -> str:
    import torch

    return f"cpu:{_cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _median_ms(fn, repeats: int) -> float:
    """Median over `repeats` samples; each sample averages enough calls to last ≥ 2 ms."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(1000, int(0.002 / once)))
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1000.0)
    return statistics.median(samples)


def _kernels():
    try:
        from diffpro_cli.quant.layers import quantize_module
    except ImportError:
        return None
    return quantize_module


def measure_linear_ms(in_f: int, out_f: int, tokens: int, opt: Option, repeats: int) -> float:
    """Forward time (ms) of one Linear(in_f → out_f) on [tokens, in_f] under `opt`: fp32 nn.Linear, or
    quantize_module(...) from diffpro_cli.quant.layers (the real integer kernels)."""
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f).eval()
    x = torch.randn(tokens, in_f)
    with torch.no_grad():
        if opt.full_precision:
            return _median_ms(lambda: lin(x), repeats)
        quantize_module = _kernels()
        if quantize_module is None:
            raise InputError("latency: the integer kernels (diffpro_cli.quant.layers) are not installed yet; "
                             "pass --latency-source analytic for a labelled estimate")
        try:
            static = float(x.abs().max()) if opt.act_bits < 16 and opt.act_mode == "static" else None
            q = quantize_module(lin, opt.weight_bits, act_bits=opt.act_bits, act_mode=opt.act_mode,
                                group_size=opt.group_size, static_absmax=static)
            q.eval()
            return _median_ms(lambda: q(x), repeats)
        except Exception as exc:  # an option the kernels do not support
            raise InputError(f"latency: kernel for {opt.label()} on Linear({in_f}, {out_f}) failed "
                             f"({str(exc).splitlines()[0][:80]}); drop that option from --bits/--act-bits") from None


class CostTable:
    """WORKDIR/cost_table.json: measured latencies keyed by device, torch version, threads, shape and option."""

    def __init__(self, path: str | Path, ui: UI = QUIET_UI):
        from diffpro_cli.artifacts import read_json

        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if self.path.exists():
            try:
                self.entries = read_json(self.path, COST_SCHEMA)["entries"]
            except (InputError, KeyError):
                ui.warn(f"{self.path}: unreadable cost table cache; re-measuring")

    def get_or_measure(self, key: str, measure: Callable[[], float], source: str) -> float:
        entry = self.entries.get(key)
        if entry is None:
            entry = {"ms": measure(), "source": source}
            self.entries[key] = entry
            self.dirty = True
        return float(entry["ms"])

    def save(self) -> None:
        from diffpro_cli.artifacts import atomic_write_json

        if self.dirty:
            atomic_write_json(self.path, {"schema": COST_SCHEMA, "entries": self.entries})
            self.dirty = False


def measured_latency_fn(table: CostTable, cfg: AllocateConfig) -> Callable[[Layer, Option], float]:
    """latency_fn(layer, option) → ms, from the cache or measured now. Conv layers are timed as their
    im2col GEMM (in_features × out_features over `tokens` rows). With cfg.latency_source == "analytic"
    a quantized option is estimated as the measured fp32 time × max(weight bits, act bits) / 32 (a
    labelled estimate, not a kernel measurement)."""
    dev = device_key()
    fp = Option(16, 16, cfg.act_mode, None)

    def latency(layer: Layer, opt: Option) -> float:
        tokens = layer.tokens(cfg.tokens)
        if tokens is None:
            raise UsageError(f"scores.json has no MACs for {layer.name}; pass --tokens (tokens per image, e.g. 256 for DiT-XL/2 at 256px)")
        if cfg.latency_source == "analytic" and not opt.full_precision:
            return latency(layer, fp) * max(opt.weight_bits, opt.act_bits) / 32.0
        key = f"{dev}|linear {tokens}x{layer.in_features}x{layer.out_features}|{opt.label()}"
        return table.get_or_measure(key, lambda: measure_linear_ms(layer.in_features, layer.out_features, tokens, opt,
                                                                   cfg.repeats), "measured")

    return latency


def measure_remainder_ms(load: Callable[[], object], model_spec: str, layers: list[Layer], latency_fn, table: CostTable,
                         repeats: int, ui: UI = QUIET_UI) -> tuple[float, str]:
    """Non-GEMM time per step: the whole fp32 model forward (batch 1) minus the sum of its fp32 layer times.
    `load()` gives the model (the stage context's loader: a module:factory model needs its trust flag;
    refusing untrusted code is an error, not a silent 0 ms)."""
    import torch

    from diffpro_cli.errors import DiffproError, TrustError

    fp = Option(16, 16, "dynamic", None)
    gemm = sum(latency_fn(l, fp) for l in layers)
    key = f"{device_key()}|model {model_spec}|forward batch 1"

    def forward_ms() -> float:
        model = load()
        x = torch.randn(1, *model.sample_shape)
        t = torch.full((1,), model.num_train_timesteps // 2)
        y = torch.zeros(1, dtype=torch.long) if model.num_classes is not None else None
        with torch.no_grad():
            return _median_ms(lambda: model.eps(x, t, y), repeats)

    try:
        total = table.get_or_measure(key, forward_ms, "measured")
    except TrustError:
        raise
    except DiffproError as exc:
        ui.warn(f"non-GEMM remainder not measured ({exc.message}); counting 0 ms, pass --remainder-ms to set it")
        return 0.0, "unavailable"
    return max(0.0, total - gemm), "measured"


# ---------------------------------------------------------------------------------------------
# The table and the solvers
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    layers: list[Layer]
    options: list[Option]
    bits: np.ndarray        # [L, O] int64 storage bits
    error: np.ndarray       # [L, O] predicted error
    latency: np.ndarray     # [L, O] ms, nan when not measured
    valid: np.ndarray       # [L, O] the option exists for the layer (all True since group sizes fall back per layer)
    violates: np.ndarray    # [L, O] below the protection floor of a protected layer
    error_model: str
    protect: set[str]       # protected roles
    fp_latency: np.ndarray | None = None   # [L] ms of each layer kept at fp32 (the speed-up baseline)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)


def build_table(layers: list[Layer], options: list[Option], cfg: AllocateConfig,
                latency_fn: Callable[[Layer, Option], float] | None, proxy_bits: int = 4) -> Table:
    name, bit_error = error_model(layers, cfg.error_model, proxy_bits)
    act_name, act_error = activation_error_model(layers, name, bit_error)
    name = f"weights: {name}; activations: {act_name}"
    L, O = len(layers), len(options)
    bits = np.zeros((L, O), dtype=np.int64)
    err = np.zeros((L, O))
    lat = np.full((L, O), np.nan)
    valid = np.ones((L, O), dtype=bool)
    violates = np.zeros((L, O), dtype=bool)
    protect = set(cfg.protect)
    for i, layer in enumerate(layers):
        for j, option in enumerate(options):
            opt = effective_option(layer, option)
            bits[i, j] = option_bits(layer, opt)
            err[i, j] = option_error(bit_error, act_error, layer, opt)
            violates[i, j] = layer.role in protect and opt.weight_bits < cfg.protect_bits
            if latency_fn is not None:
                lat[i, j] = latency_fn(layer, opt)
    fp_latency = None
    if latency_fn is not None:
        fp = Option(16, 16, cfg.act_mode, None)
        fp_latency = np.array([latency_fn(layer, fp) for layer in layers], dtype=float)
    return Table(layers, options, bits, err, lat, valid, violates, name, protect, fp_latency)


@dataclass
class Constraint:
    name: str            # shown in messages, e.g. "avg-bits"
    cost: np.ndarray     # [L, O]
    limit: float         # Σ chosen cost ≤ limit


@dataclass
class Solution:
    choice: list[int]    # option index per layer
    status: str
    gap: float | None
    method: str
    relaxed: int = 0     # protected layers pushed below the floor because the budget forced it


def solve_milp(error: np.ndarray, constraints: list[Constraint], allowed: np.ndarray,
               penalty: np.ndarray | None = None, time_limit: float = 60.0) -> Solution | None:
    """min Σ error·x  s.t. one option per layer, every constraint row, x binary. None when infeasible.

    Errors are scaled to max 1 for conditioning; `penalty` (added as is) makes protection soft.
    After rounding, each constraint is checked exactly; a row broken by solver tolerance is tightened
    by the excess and the problem solved again.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    L, O = error.shape
    cells = np.argwhere(allowed)                     # one binary per allowed (layer, option)
    scale = error[allowed].max() if error[allowed].max() > 0 else 1.0
    c = error[allowed] / scale + (penalty[allowed] if penalty is not None else 0.0)
    onehot = csr_matrix((np.ones(len(cells)), (cells[:, 0], np.arange(len(cells)))), shape=(L, len(cells)))
    limits = [float(k.limit) for k in constraints]
    for _ in range(5):
        rows = [LinearConstraint(onehot, 1, 1)]
        rows += [LinearConstraint(k.cost[allowed][None, :], -np.inf, lim) for k, lim in zip(constraints, limits)]
        res = milp(c, integrality=np.ones(len(cells)), bounds=Bounds(0, 1), constraints=rows,
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        if res.x is None:
            return None
        x = np.round(res.x).astype(bool)
        choice = [0] * L
        for (i, j), on in zip(cells, x):
            if on:
                choice[i] = int(j)
        excess = [chosen_total(k.cost, choice) - k.limit for k in constraints]
        if all(e <= 0 for e in excess):
            status = {0: "optimal", 1: "time limit (best found)"}.get(res.status, res.message)
            gap = getattr(res, "mip_gap", None)
            return Solution(choice, status, float(gap) if gap is not None else None, "milp")
        limits = [lim - max(e, 0) - 1e-9 * max(1.0, abs(lim)) for lim, e in zip(limits, excess)]
    return None


def chosen_total(cost: np.ndarray, choice: list[int]):
    """Σ cost[l, choice[l]] (exact Python ints for integer tables)."""
    return sum(cost[i, j].item() for i, j in enumerate(choice))


def solve_cdf(table: Table, constraints: list[Constraint], protect: bool = True) -> Solution | None:
    """The paper's rank/CDF rule: layers whose score CDF exceeds θ keep the high bits, the rest get the
    low bits (the largest / smallest quantized weight width); protected roles never go below their
    floor; θ is the smallest threshold that meets every budget. One activation width for all layers:
    the one of --act-bits whose plan predicts the least error. If no plan keeps the protection, the
    rule runs again without it."""
    quant = [j for j, o in enumerate(table.options) if not o.full_precision]
    if not quant:
        return Solution([0] * len(table.layers), "rule", None, "cdf")
    best = None
    for act in sorted({table.options[j].act_bits for j in quant}):
        sol = _cdf_threshold(table, constraints, [j for j in quant if table.options[j].act_bits == act], protect)
        if sol is not None and (best is None or chosen_total(table.error, sol.choice) < chosen_total(table.error, best.choice)):
            best = sol
    if best is None and protect:
        return solve_cdf(table, constraints, protect=False)
    return best


def _cdf_threshold(table: Table, constraints: list[Constraint], family: list[int], protect: bool) -> Solution | None:
    """The smallest θ for which 'cdf > θ → highest width of `family`, else lowest' meets every budget."""
    by_bits = {table.options[j].weight_bits: j for j in family}
    low, high = by_bits[min(by_bits)], by_bits[max(by_bits)]
    cdfs = np.array([l.cdf for l in table.layers])
    for theta in [-1.0] + sorted(set(cdfs.tolist())):
        choice = []
        for i in range(len(table.layers)):
            j = high if cdfs[i] > theta else low
            if protect and table.violates[i, j]:
                ok = [k for k in family if not table.violates[i, k] and table.valid[i, k]]
                j = min(ok, key=lambda k: table.options[k].weight_bits) if ok else j
            if not table.valid[i, j]:
                j = next(k for k in range(len(table.options)) if table.valid[i, k])
            choice.append(j)
        if all(chosen_total(k.cost, choice) <= k.limit for k in constraints):
            return Solution(choice, f"rule (theta={theta:.3g}, a{table.options[family[0]].act_bits})", None, "cdf")
    return None


def smallest_feasible(table: Table, k: Constraint) -> float:
    """Σ over layers of the cheapest valid option (protection ignored: the budget may force it)."""
    return float(sum(np.min(k.cost[i][table.valid[i]]) for i in range(len(table.layers))))


def solve(table: Table, constraints: list[Constraint], method: str, time_limit: float, ui: UI = QUIET_UI) -> Solution | None:
    """Protected layers stay at ≥ the floor when some plan allows it; otherwise the floor is relaxed for
    as few protected layers as possible (lexicographic penalty), with a warning."""
    if method == "cdf":
        sol = solve_cdf(table, constraints)
    else:
        strict = table.valid & ~table.violates
        sol = None
        if strict.any(axis=1).all():
            sol = solve_milp(table.error, constraints, strict, time_limit=time_limit)
        if sol is None:
            penalty = np.where(table.violates, float(len(table.layers) + 1), 0.0)
            sol = solve_milp(table.error, constraints, table.valid, penalty=penalty, time_limit=time_limit)
    if sol is not None:
        sol.relaxed = int(sum(table.violates[i, j] for i, j in enumerate(sol.choice)))
    return sol


# ---------------------------------------------------------------------------------------------
# Budgets → constraint rows, infeasibility messages
# ---------------------------------------------------------------------------------------------


def budget_constraint(table: Table, budget: Budget, remainder_ms: float, other_bytes: int) -> Constraint:
    if budget.kind == "avg-bits":
        return Constraint("avg-bits", table.bits, math.floor(budget.value * table.params + 1e-9))
    if budget.kind == "size-mb":
        return Constraint("size-mb", table.bits, math.floor((budget.value * 1e6 - other_bytes) * 8 + 1e-9))
    _require_latency(table, "--budget latency-ms")
    return Constraint("latency-ms", table.latency, budget.value - remainder_ms)


def speedup_constraint(table: Table, min_speedup: float, remainder_ms: float) -> Constraint:
    """Per-step latency (chosen layers + remainder) ≤ the all-fp32 step's latency / min_speedup: a
    ratio against a baseline measured in the same run, so one config works on any machine. With
    --act-bits 8,16 this is what keeps float activations for the few layers where they pay."""
    _require_latency(table, "--min-speedup")
    fp_step = float(table.fp_latency.sum()) + remainder_ms
    return Constraint("min-speedup", table.latency, fp_step / min_speedup - remainder_ms)


def predicted_speedup(table: Table, sol: "Solution", remainder_ms: float) -> float | None:
    """fp32 step latency / the plan's step latency, from the cost table (None when not measured)."""
    if table.fp_latency is None or np.isnan(table.fp_latency).any():
        return None
    lat = chosen_total(table.latency, sol.choice)
    if not math.isfinite(lat):
        return None
    return (float(table.fp_latency.sum()) + remainder_ms) / (lat + remainder_ms)


def _require_latency(table: Table, what: str) -> None:
    if np.isnan(table.latency[table.valid]).any():
        raise UsageError(f"{what} needs the latency cost table; it was not measured (see the warning above)")


def budget_value(table: Table, budget: Budget, limit: float, remainder_ms: float, other_bytes: int) -> float:
    """A constraint limit (bits or layer ms) expressed in the budget's own unit."""
    if budget.kind == "avg-bits":
        return limit / table.params
    if budget.kind == "size-mb":
        return (limit / 8 + other_bytes) / 1e6
    return limit + remainder_ms


def infeasible_message(table: Table, budget: Budget, k: Constraint, remainder_ms: float, other_bytes: int) -> str:
    low = budget_value(table, budget, smallest_feasible(table, k), remainder_ms, other_bytes)
    digits = 100 if budget.kind == "avg-bits" else 1000
    need = math.ceil(low * digits) / digits
    return (f"budget {budget} is infeasible: the smallest feasible is {budget.kind}={need:g} "
            f"(every layer at its cheapest option); raise the budget or add lower --bits")


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def summarize(table: Table, sol: Solution, remainder_ms: float, other_bytes: int) -> dict:
    total_bits = chosen_total(table.bits, sol.choice)
    has_lat = not np.isnan([table.latency[i, j] for i, j in enumerate(sol.choice)]).any()
    lat = chosen_total(table.latency, sol.choice) + remainder_ms if has_lat else None
    return {
        "avg_bits": total_bits / table.params,
        "bytes": total_bits / 8,
        "other_bytes": other_bytes,
        "latency_ms": lat,
        "error": float(chosen_total(table.error, sol.choice)),
        "params": table.params,
        "remainder_ms": remainder_ms if has_lat else None,
    }


def plan_layers(table: Table, sol: Solution) -> dict:
    out = {}
    for i, (layer, j) in enumerate(zip(table.layers, sol.choice)):
        opt = effective_option(layer, table.options[j])
        lat = table.latency[i, j]
        out[layer.name] = {
            "weight_bits": opt.weight_bits, "act_bits": opt.act_bits, "act_mode": opt.act_mode,
            "group_size": None if opt.full_precision else opt.group_size,
            "role": layer.role, "protected": layer.role in table.protect,
            "bytes": int(table.bits[i, j]) / 8, "latency_ms": None if np.isnan(lat) else float(lat),
            "error": float(table.error[i, j]),
        }
    return out


@dataclass
class StepEntry:
    steps: int
    timesteps: list[int]
    drift: float | None


def step_entries(cfg: AllocateConfig, timesteps: dict | None, num_train: int = 1000) -> list[StepEntry]:
    """Candidate step counts for the joint plan: the artifact's sweep (--steps auto), one of its entries
    (--steps K), its single subset, or the uniform subset of K steps when no artifact is given."""
    if timesteps is None:
        if cfg.steps is None or cfg.steps == "auto":
            raise UsageError("--latency-budget needs steps: pass --timesteps timesteps.json (from `diffpro prune`) or --steps K")
        from diffpro_cli.sampling import uniform_timesteps

        k = _int_steps(cfg.steps)
        return [StepEntry(k, uniform_timesteps(num_train, k), None)]
    sweep = timesteps.get("sweep") or []
    entries = [StepEntry(int(s["steps"]), list(s["timesteps"]), s.get("drift")) for s in sweep]
    if not entries:
        entries = [StepEntry(len(timesteps["timesteps"]), list(timesteps["timesteps"]), timesteps.get("drift"))]
    if cfg.steps is None or cfg.steps == "auto":
        return entries
    k = _int_steps(cfg.steps)
    match = [e for e in entries if e.steps == k]
    if not match:
        raise UsageError(f"--steps {k}: the timesteps artifact has step counts {sorted(e.steps for e in entries)}; "
                         f"pick one, pass --steps auto, or re-run prune with --sweep {k}")
    return match


def _int_steps(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--steps {text!r}: use a step count or auto") from None
    if k < 1:
        raise UsageError(f"--steps {k}: must be at least 1")
    return k


def solve_joint(table: Table, cfg: AllocateConfig, entries: list[StepEntry], extra: list[Constraint],
                remainder_ms: float, ui: UI = QUIET_UI) -> tuple[StepEntry, Solution, list[dict]]:
    """For every step count K: per-step latency ≤ budget / K; keep the least drift + weight × quant error."""
    _require_latency(table, "--latency-budget")
    rows, best = [], None
    for e in sorted(entries, key=lambda e: e.steps):
        per_step = cfg.latency_budget / e.steps
        k = Constraint("latency-ms", table.latency, per_step - remainder_ms)
        sol = solve(table, [k] + extra, cfg.method, cfg.time_limit) if smallest_feasible(table, k) <= k.limit else None
        row = {"steps": e.steps, "per_step_budget_ms": per_step, "feasible": sol is not None, "drift": e.drift}
        if sol is not None:
            q = float(chosen_total(table.error, sol.choice))
            combined = (e.drift or 0.0) + cfg.quant_weight * q
            row.update(quant_error=q, combined_error=combined,
                       per_step_ms=chosen_total(table.latency, sol.choice) + remainder_ms,
                       total_latency_ms=e.steps * (chosen_total(table.latency, sol.choice) + remainder_ms))
            if best is None or combined < best[2]:
                best = (e, sol, combined)
        rows.append(row)
    if best is None:
        cheapest = min(e.steps * (smallest_feasible(table, Constraint("", table.latency, 0)) + remainder_ms) for e in entries)
        k_min = min(entries, key=lambda e: e.steps).steps
        raise BudgetError(f"--latency-budget {cfg.latency_budget:g} ms is infeasible: the smallest feasible is "
                          f"{math.ceil(cheapest * 1000) / 1000:g} ms ({k_min} steps at the cheapest bits); raise it or prune to fewer steps")
    return best[0], best[1], rows


def allocate_plan(scores: dict, cfg: AllocateConfig, *, latency_fn: Callable[[Layer, Option], float] | None = None,
                  remainder_ms: float = 0.0, remainder_source: str = "given", latency_source: str = "given",
                  timesteps: dict | None = None, scores_path: str | Path = "scores.json", ui: UI = QUIET_UI) -> tuple[dict, dict | None]:
    """The plan.json payload (and the Pareto payload with cfg.pareto). Pure: writes nothing."""
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method}: use milp or cdf")
    if cfg.budget is None and cfg.latency_budget is None:
        raise UsageError("no budget: pass --budget avg-bits=5.0 (or size-mb=… / latency-ms=…) or --latency-budget MS with --timesteps")
    if cfg.latency_budget is not None and cfg.latency_budget <= 0:
        raise UsageError(f"--latency-budget {cfg.latency_budget}: must be a positive number of milliseconds per image")
    if cfg.min_speedup is not None and not (math.isfinite(cfg.min_speedup) and cfg.min_speedup > 0):
        raise UsageError(f"--min-speedup {cfg.min_speedup}: must be a positive ratio against fp32, e.g. 1.5")
    budget = parse_budget(cfg.budget) if cfg.budget else None
    layers = load_layers(scores, scores_path)
    options = make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    proxy_bits = int((scores.get("config") or {}).get("proxy_bits", 4))
    table = build_table(layers, options, cfg, latency_fn, proxy_bits)
    other_bytes = 4 * max(0, int((scores.get("model") or {}).get("params") or 0) - table.params)

    constraints = []
    if budget is not None:
        k = budget_constraint(table, budget, remainder_ms, other_bytes)
        if smallest_feasible(table, k) > k.limit:
            raise BudgetError(infeasible_message(table, budget, k, remainder_ms, other_bytes))
        constraints.append(k)
    if cfg.min_speedup is not None:
        k = speedup_constraint(table, cfg.min_speedup, remainder_ms)
        if smallest_feasible(table, k) > k.limit:
            fp_step = float(table.fp_latency.sum()) + remainder_ms
            best = fp_step / (smallest_feasible(table, k) + remainder_ms)
            raise BudgetError(f"--min-speedup {cfg.min_speedup:g} is infeasible: the fastest plan of these options is "
                              f"{math.floor(best * 100) / 100:g}x per step; lower --min-speedup or allow lower --bits / --act-bits")
        constraints.append(k)

    joint = None
    step_list = None
    if cfg.latency_budget is not None:
        entries = step_entries(cfg, timesteps)
        entry, sol, rows = solve_joint(table, cfg, entries, constraints, remainder_ms, ui)
        step_list = entry.timesteps
        totals = summarize(table, sol, remainder_ms, other_bytes)
        joint = {"steps": entry.steps, "drift": entry.drift, "quant_error": totals["error"],
                 "quant_weight": cfg.quant_weight,
                 "combined_error": (entry.drift or 0.0) + cfg.quant_weight * totals["error"],
                 "latency_budget_ms": cfg.latency_budget, "total_latency_ms": entry.steps * totals["latency_ms"],
                 "candidates": rows}
    else:
        sol = solve(table, constraints, cfg.method, cfg.time_limit, ui)
        if sol is None:
            raise BudgetError(f"budget {budget} cannot be met together with the other constraints; raise it")
        if timesteps is not None:          # no joint choice: the plan carries the pruned subset as is
            step_list = list(timesteps["timesteps"])
    if sol.relaxed:
        ui.warn(f"the budget forces {sol.relaxed} protected layer(s) below {cfg.protect_bits} bits")

    totals = summarize(table, sol, remainder_ms, other_bytes)
    totals["latency_source"] = latency_source if latency_fn is not None else None
    totals["predicted_speedup"] = predicted_speedup(table, sol, remainder_ms)
    totals["remainder_source"] = remainder_source if latency_fn is not None else None
    comparison = {}
    if cfg.method == "milp" and cfg.latency_budget is None:
        alt = solve(table, constraints, "cdf", cfg.time_limit)
        if alt is not None:
            comparison["cdf"] = {k: summarize(table, alt, remainder_ms, other_bytes)[k] for k in ("avg_bits", "error", "latency_ms")}
            comparison["cdf"]["protected_relaxed"] = alt.relaxed
    plan = {
        "schema": PLAN_SCHEMA,
        "model": scores.get("model"),
        "scores_sha256": None,
        "layers": plan_layers(table, sol),
        "totals": totals,
        "budget": {"kind": budget.kind, "value": budget.value} if budget else None,
        "min_speedup": cfg.min_speedup,
        "solver": {"method": sol.method, "status": sol.status, "gap": sol.gap, "protected_relaxed": sol.relaxed},
        "options": {"bits": sorted(set(cfg.bits)), "act_bits": sorted(set(cfg.act_bits)), "act_mode": cfg.act_mode,
                    "group_size": cfg.group_size, "protect": list(cfg.protect), "protect_bits": cfg.protect_bits},
        "error_model": table.error_model,
        "conventions": {"avg_bits": "storage bits (weights, fp32 scales, fp32 bias; 16 = kept at fp32) / parameters of the scored layers",
                        "bytes": "scored layers only; other_bytes = remaining parameters at fp32",
                        "latency_ms": "one denoising step, batch 1: chosen layer latencies + non-GEMM remainder",
                        "size_mb": "1 MB = 1e6 bytes"},
        "comparison": comparison,
        "timesteps": step_list,
        "joint": joint,
    }
    pareto = pareto_front(table, cfg, budget, constraints, remainder_ms, other_bytes, timesteps, plan) if cfg.pareto else None
    return plan, pareto


def pareto_front(table: Table, cfg: AllocateConfig, budget: Budget | None, constraints: list[Constraint],
                 remainder_ms: float, other_bytes: int, timesteps: dict | None, plan: dict, points: int = 12) -> dict:
    """Sweep the budget from the smallest feasible value to the one where nothing binds; MILP and CDF
    rule at each (joint mode: the joint plan at each total latency)."""
    out = []
    if cfg.latency_budget is not None:
        entries = step_entries(cfg, timesteps)
        per_step_lo = smallest_feasible(table, Constraint("", table.latency, 0)) + remainder_ms
        lo = min(e.steps for e in entries) * per_step_lo
        hi = max(e.steps for e in entries) * (float(np.max(np.where(table.valid, table.latency, -np.inf), axis=1).sum()) + remainder_ms)
        for value in np.linspace(lo, max(hi, lo), points):
            sub = AllocateConfig(**{**cfg.as_dict(), "latency_budget": float(value) * (1 + 1e-9), "pareto": False})
            try:
                entry, sol, _ = solve_joint(table, sub, entries, [], remainder_ms)
            except BudgetError:
                continue
            q = float(chosen_total(table.error, sol.choice))
            per_step = chosen_total(table.latency, sol.choice) + remainder_ms
            out.append({"method": "joint", "budget": float(value), "steps": entry.steps, "total_latency_ms": entry.steps * per_step,
                        "error": (entry.drift or 0.0) + cfg.quant_weight * q, "quant_error": q})
        x, x_label = "total_latency_ms", "total latency per image (ms)"
        chosen = {"total_latency_ms": plan["joint"]["total_latency_ms"], "error": plan["joint"]["combined_error"]}
    else:
        k0 = constraints[0]
        lo = smallest_feasible(table, k0)
        best_err = np.where(table.valid, table.error, np.inf).argmin(axis=1)
        hi = max(chosen_total(k0.cost, best_err.tolist()), lo)
        for value in np.linspace(lo, hi, points):
            k = Constraint(k0.name, k0.cost, float(value) if k0.name == "latency-ms" else math.floor(value))
            for method in METHODS:
                sol = solve(table, [k, *constraints[1:]], method, cfg.time_limit)
                if sol is not None:
                    s = summarize(table, sol, remainder_ms, other_bytes)
                    out.append({"method": method, "budget": budget_value(table, budget, k.limit, remainder_ms, other_bytes), **{key: s[key] for key in ("avg_bits", "bytes", "latency_ms", "error")}})
        x = "latency_ms" if budget.kind == "latency-ms" else "avg_bits"
        x_label = "latency per step (ms)" if x == "latency_ms" else "average weight bits"
        chosen = {x: plan["totals"][x], "error": plan["totals"]["error"]}
    method = "joint" if cfg.latency_budget is not None else "milp"
    front = [p for p in out if p["method"] == method and not any(
        q["method"] == method and q[x] <= p[x] and q["error"] <= p["error"] and (q[x] < p[x] or q["error"] < p["error"]) for q in out)]
    return {"schema": PARETO_SCHEMA, "x": x, "x_label": x_label, "points": out,
            "front": sorted(front, key=lambda p: p[x]), "chosen": chosen,
            "title": f"predicted error vs {x_label}"}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def needs_latency(cfg: AllocateConfig) -> bool:
    return (cfg.latency_budget is not None or cfg.min_speedup is not None
            or (cfg.budget is not None and parse_budget(cfg.budget).kind == "latency-ms"))


def run_allocate(ctx, cfg: AllocateConfig, *, scores_path: str | Path | None = None,
                 timesteps_path: str | Path | None = None, latency_fn: Callable[[Layer, Option], float] | None = None):
    """Write WORKDIR/plan.json (+ pareto.json and figures/pareto.png with cfg.pareto). Returns a
    StageResult (value: the plan).

    `latency_fn(layer, option) → ms` replaces the measured cost table (tests); then the remainder is
    cfg.remainder_ms or 0. The model timed for the remainder is the context's (default: the scored one).
    """
    from diffpro_cli.artifacts import atomic_write_json, input_record, read_json
    from diffpro_cli.stages.context import StageResult

    ui = ctx.ui
    workdir = ctx.workdir
    scores_path = Path(scores_path) if scores_path is not None else workdir / "scores.json"
    scores = read_json(scores_path, SCORES_SCHEMA)
    timesteps = None
    if cfg.steps == "auto" and timesteps_path is None:
        timesteps_path = workdir / "timesteps.json"
    if timesteps_path is not None:
        timesteps = read_json(timesteps_path, TIMESTEPS_SCHEMA)
    # validate every option before measuring anything
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method}: use milp or cdf")
    if cfg.latency_source not in LATENCY_SOURCES:
        raise UsageError(f"--latency-source {cfg.latency_source}: use measured or analytic")
    if cfg.budget:
        parse_budget(cfg.budget)
    if cfg.min_speedup is not None and not (math.isfinite(cfg.min_speedup) and cfg.min_speedup > 0):
        raise UsageError(f"--min-speedup {cfg.min_speedup}: must be a positive ratio against fp32, e.g. 1.5")
    make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size)
    from diffpro_cli.models.base import ROLES

    unknown = [r for r in cfg.protect if r not in ROLES]
    if unknown:
        raise UsageError(f"--protect {','.join(unknown)}: unknown role; use a comma list of {','.join(ROLES)} or none")
    layers = load_layers(scores, scores_path)
    error_model(layers, cfg.error_model)
    if cfg.steps is not None and cfg.latency_budget is None:
        raise UsageError("--steps chooses step counts for the joint plan; add --latency-budget MS (total per image) or drop --steps")
    if timesteps is not None:
        t_spec, s_spec = (timesteps.get("model") or {}).get("spec"), (scores.get("model") or {}).get("spec")
        if t_spec and s_spec and t_spec != s_spec:
            ui.warn(f"{timesteps_path} was pruned for {t_spec} but the scores are for {s_spec}")
    if cfg.latency_budget is not None:
        step_entries(cfg, timesteps)
    if cfg.budget and parse_budget(cfg.budget).kind != "latency-ms":   # size budgets: fail before timing anything
        budget = parse_budget(cfg.budget)
        table = build_table(layers, make_options(cfg.bits, cfg.act_bits, cfg.act_mode, cfg.group_size), cfg, None)
        other_bytes = 4 * max(0, int((scores.get("model") or {}).get("params") or 0) - table.params)
        k = budget_constraint(table, budget, 0.0, other_bytes)
        if smallest_feasible(table, k) > k.limit:
            raise BudgetError(infeasible_message(table, budget, k, 0.0, other_bytes))

    inputs = {"scores": input_record(scores_path)}
    if timesteps_path is not None:
        inputs["timesteps"] = input_record(timesteps_path)
    out = workdir / "plan.json"
    outputs = {"plan": out}
    if cfg.pareto:
        outputs["pareto"] = workdir / "pareto.json"
        outputs["pareto_figure"] = workdir / "figures" / "pareto.png"
    holder = {}

    def compute():
        fn, remainder, rsource, lsource = latency_fn, cfg.remainder_ms or 0.0, "given", "injected"
        if fn is None:
            cache = CostTable(workdir / "cost_table.json", ui)
            fn, lsource = measured_latency_fn(cache, cfg), cfg.latency_source
            if cfg.latency_source == "measured" and _kernels() is None:
                if needs_latency(cfg):
                    raise InputError("latency: the integer kernels (diffpro_cli.quant.layers) are not installed yet; "
                                     "pass --latency-source analytic for a labelled estimate")
                ui.warn("integer kernels not installed: plan latency not predicted (totals.latency_ms = null)")
                fn, lsource = None, None
            if fn is not None:
                ui.info(f"allocate: cost table ({lsource}) in {cache.path}")
                if cfg.remainder_ms is None:
                    if not ctx.model_spec:     # `diffpro allocate` without --model: the scored model
                        ctx.model_spec = (scores.get("model") or {}).get("spec", "")
                    spec = ctx.model_spec
                    remainder, rsource = measure_remainder_ms(ctx.load, spec, load_layers(scores, scores_path),
                                                              fn, cache, cfg.repeats, ui)
            try:
                plan, pareto = allocate_plan(scores, cfg, latency_fn=fn, remainder_ms=remainder, remainder_source=rsource,
                                             latency_source=lsource, timesteps=timesteps, scores_path=scores_path, ui=ui)
            finally:
                cache.save()
        else:
            plan, pareto = allocate_plan(scores, cfg, latency_fn=fn, remainder_ms=remainder, remainder_source=rsource,
                                         latency_source=lsource, timesteps=timesteps, scores_path=scores_path, ui=ui)
        plan["scores_sha256"] = inputs["scores"]["sha256"]
        if pareto is not None:
            from diffpro_cli.plots import plot_pareto

            atomic_write_json(outputs["pareto"], pareto)
            plot_pareto(pareto, outputs["pareto_figure"])
        atomic_write_json(out, plan)
        holder["plan"] = plan

    config = {**cfg.as_dict(), "latency_injected": latency_fn is not None}
    outcome = ctx.run_stage("allocate", inputs, config, outputs, compute)
    plan = holder.get("plan") or read_json(out, PLAN_SCHEMA)
    return StageResult(outcome, plan)
