"""Latency cost table (measured on this machine with the kernels quantize will emit)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.planning.options import Layer, Option

COST_SCHEMA = "diffpro.cost_table/1"

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


def measured_latency_fn(table: CostTable, cfg) -> Callable[[Layer, Option], float]:
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


