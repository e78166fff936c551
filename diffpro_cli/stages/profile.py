"""profile: seeded calibration sampling that records per-layer activation statistics.

Every nn.Linear / nn.Conv2d is seen through the matrix its GEMM multiplies: its input as
[rows, d], rows = tokens (Linear) or output pixels (Conv2d, whose input is unfolded into patches of
d = C_in·kh·kw values, channel-major like `weight.reshape(out, -1)`). Nothing raw is kept: memory
does not grow with the number of samples. Per layer the profiler keeps

  per timestep (cheap):  rows, mean, mean Σx² per row (energy), min, max, |x|max, a signed log
                         histogram (percentiles come from it), and the output energy mean Σy²;
  over all timesteps:    per-channel mean, mean square and |x|max, and the d×d second moment in
                         float64 from which the covariance and its PCA spectrum are computed.

Wide layers (d > max_dim) keep the second moment of a seeded CountSketch of width max_dim instead
(see docs/sensitivity.md for its error); calls with more than max_rows rows feed a seeded random
subset of max_rows rows to the second moment (all other statistics always use every row). Layers
fed the very same input tensor (q/k/v projections) share one accumulator.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffpro_cli.errors import InputError, UsageError

SCHEMA = "diffpro.profile/1"
# |x| histogram on a binary-log grid read straight from the float32 bits: 2**HIST_MANT_BITS bins per
# octave (relative bin width ≤ 12.5%) over [2**HIST_EXP_LO, 2**HIST_EXP_HI) ≈ [9.5e-7, 1.05e6).
HIST_MANT_BITS, HIST_EXP_LO, HIST_EXP_HI = 3, -20, 20
HIST_K = (HIST_EXP_HI - HIST_EXP_LO) << HIST_MANT_BITS   # magnitude bins per sign
HIST_BINS = 2 * HIST_K + 1                               # [-big .. -small] [|x| < 2**-20] [small .. big]
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)            # of |x|, per timestep
_RAW_SHIFT = 23 - HIST_MANT_BITS                         # float32: 23 mantissa bits
_RAW_CODES = 1 << (32 - _RAW_SHIFT)                      # sign | exponent | top mantissa bits


@dataclass
class ProfileConfig:
    samples: int = 32
    timesteps: str = "1000:0:50"
    classes: list[int] | None = None
    seed: int = 0
    batch: int = 16
    cfg_scale: float = 1.0
    method: str = "ddim"
    max_dim: int = 2048
    max_rows: int = 1024

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Inputs as GEMM matrices, histograms, percentiles
# ---------------------------------------------------------------------------------------------


def layer_input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the [rows, d] float32 matrix its GEMM multiplies."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x.float(), module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


def input_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def output_dim(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _fold_table() -> torch.Tensor:
    """Histogram bin of each raw float32 code (sign, exponent, top mantissa bits)."""
    code = torch.arange(_RAW_CODES)
    negative = code >= _RAW_CODES // 2
    j = (code % (_RAW_CODES // 2)) - ((127 + HIST_EXP_LO) << HIST_MANT_BITS)
    tiny = j < 0
    j = j.clamp(0, HIST_K - 1)
    return torch.where(tiny, HIST_K, torch.where(negative, HIST_K - 1 - j, HIST_K + 1 + j))


_FOLD = _fold_table()


def signed_log_hist(x: torch.Tensor) -> torch.Tensor:
    """Counts of x in HIST_BINS signed binary-log bins (int64). Three passes over x, no log()."""
    bits = x.float().contiguous().reshape(-1).view(torch.int32)
    raw = torch.bincount((bits >> _RAW_SHIFT) & (_RAW_CODES - 1), minlength=_RAW_CODES)
    return torch.zeros(HIST_BINS, dtype=torch.int64).index_add_(0, _FOLD, raw)


def hist_magnitude_edges() -> torch.Tensor:
    """Edges [0, 2**-20, ..., 2**20] of the |x| histogram returned by `magnitude_hist`."""
    j = torch.arange(HIST_K + 1, dtype=torch.float64)
    per = 1 << HIST_MANT_BITS
    edges = 2.0 ** (HIST_EXP_LO + torch.div(j, per, rounding_mode="floor")) * (1 + (j % per) / per)
    return torch.cat([torch.zeros(1, dtype=torch.float64), edges])


def magnitude_hist(hist: torch.Tensor) -> torch.Tensor:
    """Signed histogram [..., HIST_BINS] → |x| histogram [..., HIST_K + 1] (bin 0 = |x| < 2**-20)."""
    zero = hist[..., HIST_K:HIST_K + 1]
    return torch.cat([zero, hist[..., HIST_K + 1:] + hist[..., :HIST_K].flip(-1)], dim=-1)


def abs_percentiles(hist: torch.Tensor, qs=PERCENTILES, absmax: float | None = None) -> list[float]:
    """Percentiles of |x| from one signed histogram, interpolated linearly inside a bin, capped at |x|max."""
    mag = magnitude_hist(hist).double()
    edges = hist_magnitude_edges()
    cum = mag.cumsum(0)
    total = float(cum[-1])
    out = []
    for q in qs:
        if total <= 0:
            out.append(0.0)
            continue
        target = q / 100.0 * total
        j = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64))), len(mag) - 1)
        below = float(cum[j] - mag[j])
        frac = min(max((target - below) / max(float(mag[j]), 1.0), 0.0), 1.0)
        value = float(edges[j]) + frac * float(edges[j + 1] - edges[j])
        out.append(min(value, absmax) if absmax is not None else value)
    return out


def layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


# ---------------------------------------------------------------------------------------------
# Streaming statistics of one layer input
# ---------------------------------------------------------------------------------------------


class LayerStats:
    """Streaming statistics of one layer input (see module docstring). Memory: O(T·bins + width²)."""

    def __init__(self, d: int, n_timesteps: int, max_dim: int = 2048, max_rows: int = 1024, seed: int = 0):
        T = n_timesteps
        self.d = d
        self.rows = torch.zeros(T, dtype=torch.int64)
        self.sum = torch.zeros(T, dtype=torch.float64)
        self.sumsq = torch.zeros(T, dtype=torch.float64)
        self.min = torch.full((T,), math.inf)
        self.max = torch.full((T,), -math.inf)
        self.hist = torch.zeros(T, HIST_BINS, dtype=torch.int64)
        self.ch_sum = torch.zeros(d, dtype=torch.float64)
        self.ch_sumsq = torch.zeros(d, dtype=torch.float64)
        self.ch_absmax = torch.zeros(d)
        self.width = min(d, max_dim)
        self.gram = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.gram_sum = torch.zeros(self.width, dtype=torch.float64)
        self.gram_rows = 0
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.bucket = self.sign = None
        if self.width < d:  # CountSketch: channel j → bucket[j] with sign[j]; balanced buckets
            g = torch.Generator().manual_seed(seed + 1)
            self.bucket = torch.randperm(d, generator=g) % self.width
            self.sign = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1

    @property
    def sketched(self) -> bool:
        return self.bucket is not None

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        if self.bucket is None:
            return x
        return torch.zeros(x.shape[0], self.width).index_add_(1, self.bucket, x * self.sign)

    def add(self, ti: int, x: torch.Tensor, elements: torch.Tensor | None = None) -> None:
        """Add GEMM rows x [n, d] observed at timestep index ti.

        `elements` (default x) feeds the histogram: for a conv, its input tensor, whose values the
        patch matrix repeats up to kh·kw times (zero padding is not counted there).
        """
        x = x.float()
        cmin, cmax = x.amin(0), x.amax(0)          # NaN propagates through amin/amax
        if not (torch.isfinite(cmin).all() and torch.isfinite(cmax).all()):
            raise ValueError("non-finite activations")
        s, sq = x.sum(0), (x * x).sum(0)
        self.rows[ti] += x.shape[0]
        self.sum[ti] += float(s.sum())
        self.sumsq[ti] += float(sq.sum())
        self.min[ti] = min(float(self.min[ti]), float(cmin.min()))
        self.max[ti] = max(float(self.max[ti]), float(cmax.max()))
        self.hist[ti] += signed_log_hist(x if elements is None else elements)
        self.ch_sum += s
        self.ch_sumsq += sq
        torch.maximum(self.ch_absmax, torch.maximum(cmax, -cmin), out=self.ch_absmax)
        if x.shape[0] > self.max_rows:
            x = x[torch.randperm(x.shape[0], generator=self.gen)[: self.max_rows]]
        z = self.sketch(x)
        self.gram.add_(z.T @ z)                    # float32 GEMM, float64 accumulator
        self.gram_sum += z.sum(0)
        self.gram_rows += z.shape[0]

    def covariance(self) -> torch.Tensor:
        """Covariance (float64, [width, width]) of the (sketched) input over all timesteps."""
        n = max(self.gram_rows, 1)
        mean = self.gram_sum / n
        return self.gram / n - torch.outer(mean, mean)

    def spectrum(self) -> torch.Tensor:
        """PCA eigenvalues of the covariance, descending, clipped at 0 (float64)."""
        cov = self.covariance()
        cov = (cov + cov.T) / 2
        return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)

    def timestep_tensors(self) -> dict[str, torch.Tensor]:
        rows = self.rows.clamp_min(1).double()
        absmax = torch.maximum(self.min.abs(), self.max.abs())
        pct = [abs_percentiles(self.hist[i], absmax=float(absmax[i])) for i in range(len(self.rows))]
        nonempty = self.rows > 0
        zero = torch.zeros_like(self.min)
        return {
            "ts_rows": self.rows.clone(),
            "ts_mean": (self.sum / rows / self.d).float(),
            "ts_energy": self.sumsq / rows,                 # mean over rows of Σ_j x_j²
            "ts_min": torch.where(nonempty, self.min, zero),
            "ts_max": torch.where(nonempty, self.max, zero),
            "ts_absmax": torch.where(nonempty, absmax, zero),
            "ts_hist": self.hist.clone(),
            "ts_percentiles": torch.tensor(pct, dtype=torch.float32).reshape(len(self.rows), len(PERCENTILES)),
        }

    def channel_tensors(self) -> dict[str, torch.Tensor]:
        n = max(int(self.rows.sum()), 1)
        return {"ch_mean": (self.ch_sum / n).float(), "ch_meansq": (self.ch_sumsq / n).float(),
                "ch_absmax": self.ch_absmax.clone()}


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def _signature(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return ("conv", module.in_channels, module.kernel_size, module.stride, module.padding, module.dilation, module.padding_mode)
    return ("linear", module.in_features)


class Profiler:
    """Forward hooks that stream every layer's input into a LayerStats (one per distinct input)."""

    def __init__(self, layers: dict[str, tuple[nn.Module, str]], timesteps: list[int], max_dim: int, max_rows: int, seed: int):
        self.layers = layers
        self.t_index = {t: i for i, t in enumerate(timesteps)}
        self.n_t = len(timesteps)
        self.max_dim, self.max_rows, self.seed = max_dim, max_rows, seed
        self.stats: dict[str, LayerStats] = {}
        self.shares: dict[str, str] = {}            # layer → owner whose input it shares
        self.out_rows = {n: torch.zeros(self.n_t, dtype=torch.int64) for n in layers}
        self.out_sumsq = {n: torch.zeros(self.n_t, dtype=torch.float64) for n in layers}
        self.samples_seen = 0                       # Σ batch sizes of the model calls
        self.ti = None
        self._last_input = None
        self._last_owner = None
        self._handles = []

    def attach(self) -> None:
        for name, (mod, _) in self.layers.items():
            self._handles.append(mod.register_forward_pre_hook(lambda m, args, name=name: self._pre(name, m, args)))
            self._handles.append(mod.register_forward_hook(lambda m, args, out, name=name: self._post(name, m, out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self, t: torch.Tensor, batch: int) -> None:
        values = set(int(v) for v in t.reshape(-1).tolist())
        if len(values) != 1 or next(iter(values)) not in self.t_index:
            raise RuntimeError(f"profiler: model called at timesteps {sorted(values)} outside the calibration schedule")
        self.ti = self.t_index[values.pop()]
        self.samples_seen += batch

    def end(self) -> None:
        self._last_input = self._last_owner = None

    def _pre(self, name: str, module: nn.Module, args) -> None:
        x = args[0]
        last = self._last_owner
        if name not in self.stats and name not in self.shares and x is self._last_input and last is not None \
                and _signature(self.layers[last][0]) == _signature(module):
            self.shares[name] = last
        owner = self.shares.get(name)
        if owner is not None:
            if x is not self._last_input or last != owner:
                raise RuntimeError(f"profiler: {name} stopped sharing its input with {owner}")
            return
        mat = layer_input_matrix(module, x)
        if name not in self.stats:
            self.stats[name] = LayerStats(mat.shape[1], self.n_t, self.max_dim, self.max_rows, layer_seed(self.seed, name))
        try:
            self.stats[name].add(self.ti, mat, elements=x if isinstance(module, nn.Conv2d) else None)
        except ValueError:
            raise InputError(f"layer {name} sees NaN/Inf activations; check the model weights before profiling") from None
        self._last_input, self._last_owner = x, name

    def _post(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        out_dim = output_dim(module)
        self.out_rows[name][self.ti] += out.numel() // out_dim
        self.out_sumsq[name][self.ti] += out.float().square().sum(dtype=torch.float64)

    def owner(self, name: str) -> str:
        return self.shares.get(name, name)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def calibration_labels(model, n: int, classes: list[int] | None) -> torch.Tensor | None:
    """Labels of the calibration samples: classes cycled, default i % num_classes, None if unconditional."""
    from diffpro_cli.sampling import default_labels

    if classes is None:
        return default_labels(model, n)
    if model.num_classes is None:
        raise UsageError(f"--classes: {model.spec} is unconditional; drop --classes")
    if not classes or any(not 0 <= c < model.num_classes for c in classes):
        raise UsageError(f"--classes: give class ids in 0..{model.num_classes - 1}, e.g. --classes 0,1,2")
    return torch.tensor([classes[i % len(classes)] for i in range(n)])


def validate_config(cfg: ProfileConfig) -> None:
    if cfg.samples < 1 or cfg.batch < 1:
        raise UsageError("--samples and --batch must be at least 1")
    if cfg.max_dim < 2 or cfg.max_rows < 2:
        raise UsageError("--max-dim and --max-rows must be at least 2")
    if cfg.method not in ("ddim", "ddpm"):
        raise UsageError(f"--method {cfg.method}: unknown sampler; use ddim or ddpm")


def profiled_layers(model) -> tuple[dict[str, tuple[nn.Module, str]], list[str]]:
    """Linear/Conv2d layers to profile, and names of other quantizable modules skipped."""
    layers, skipped = {}, []
    for name, (mod, role) in model.quantizable_layers().items():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            layers[name] = (mod, role)
        else:
            skipped.append(name)
    return layers, skipped


def collect(model, cfg: ProfileConfig, advance=lambda n=1: None) -> tuple[Profiler, list[int]]:
    """Run seeded calibration sampling with the profiler attached; returns it and the timesteps."""
    from diffpro_cli.sampling import SamplerConfig, parse_timesteps, sample

    validate_config(cfg)
    ts = parse_timesteps(cfg.timesteps, model.num_train_timesteps)
    labels = calibration_labels(model, cfg.samples, cfg.classes)
    layers, _ = profiled_layers(model)
    if not layers:
        raise InputError(f"{model.spec}: has no nn.Linear or nn.Conv2d layer to profile; pass a diffusion model")
    prof = Profiler(layers, ts, cfg.max_dim, cfg.max_rows, cfg.seed)
    inner = model.forward_fn

    def forward(net, x, t, y):
        prof.begin(t, x.shape[0])
        try:
            return inner(net, x, t, y)
        finally:
            prof.end()

    wrapped = dataclasses.replace(model, forward_fn=forward)
    sampler = SamplerConfig(method=cfg.method, cfg_scale=cfg.cfg_scale)
    prof.attach()
    try:
        sample(wrapped, cfg.samples, ts, sampler, labels=labels, seed=cfg.seed, batch_size=cfg.batch,
               advance=advance, decode=False)
    finally:
        prof.detach()
    return prof, ts


def layer_row(name: str, module: nn.Module, role: str, prof: Profiler) -> dict:
    owner = prof.owner(name)
    st = prof.stats[owner]
    d, out = input_dim(module), output_dim(module)
    groups = getattr(module, "groups", 1)
    rows = int(st.rows.sum()) / max(prof.samples_seen, 1)   # GEMM rows per sample per model call
    row = {
        "name": name, "kind": type(module).__name__, "role": role,
        "in_features": d, "out_features": out,
        "params": sum(p.numel() for p in module.parameters(recurse=False)),
        "macs": int(round(rows * (d // groups) * out)),
        "rows_per_sample": rows,
        "shares_input_with": prof.shares.get(name),
        "pca_width": st.width, "pca_method": "countsketch" if st.sketched else "exact",
        "cov_rows": st.gram_rows,
    }
    if isinstance(module, nn.Conv2d):
        row.update(kernel_size=list(module.kernel_size), stride=list(module.stride), groups=groups)
    return row


def finalize(model, prof: Profiler, ts: list[int], ui=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Spectra, per-timestep and per-channel tensors, weight-error estimates; frees the accumulators."""
    tensors = {"_timesteps": torch.tensor(ts, dtype=torch.int64), "_hist_edges_abs": hist_magnitude_edges(),
               "_percentiles": torch.tensor(PERCENTILES, dtype=torch.float64)}
    rows = []
    layers = prof.layers
    missing = [n for n in layers if prof.owner(n) not in prof.stats]
    if missing:
        raise InputError(f"{model.spec}: layers {', '.join(missing[:3])} never ran during sampling; profile a model whose layers are all used")
    per_owner = {}
    for owner, st in prof.stats.items():
        per_owner[owner] = {"pca_eigvals": st.spectrum(), **st.timestep_tensors(), **st.channel_tensors()}
        st.gram = None  # free the d×d accumulator as soon as its spectrum is known
    for name, (mod, role) in layers.items():
        owner = prof.owner(name)
        for key, value in per_owner[owner].items():
            tensors[f"{name}/{key}"] = value.clone()
        out_rows = prof.out_rows[name].clamp_min(1).double()
        tensors[f"{name}/ts_out_energy"] = prof.out_sumsq[name] / out_rows
        rows.append(layer_row(name, mod, role, prof))
    return tensors, rows


def write_profile(model, cfg: ProfileConfig, out_dir: Path, ui=None, advance=lambda n=1: None) -> tuple[Path, Path]:
    """Profile `model` and write out_dir/stats.safetensors and out_dir/profile.json atomically."""
    from diffpro_cli.artifacts import atomic_save_safetensors, atomic_write_json, sha256_file

    with torch.no_grad():
        prof, ts = collect(model, cfg, advance)
        tensors, rows = finalize(model, prof, ts, ui)
    _, skipped = profiled_layers(model)
    stats_path = Path(out_dir) / "stats.safetensors"
    atomic_save_safetensors(stats_path, tensors, metadata={"diffpro_schema": SCHEMA, "model": model.spec})
    doc = {
        "schema": SCHEMA,
        "model": model.describe(),
        "calibration": {"samples": cfg.samples, "timesteps": ts, "timesteps_spec": cfg.timesteps,
                        "classes": cfg.classes, "seed": cfg.seed, "batch": cfg.batch,
                        "sampler": {"method": cfg.method, "cfg_scale": cfg.cfg_scale}},
        "sketch": {"max_dim": cfg.max_dim, "max_rows": cfg.max_rows, "method": "countsketch",
                   "note": "layers with in_features > max_dim keep a seeded CountSketch of width max_dim for PCA"},
        "histogram": {"layout": "signed binary-log magnitude", "exp_lo": HIST_EXP_LO, "exp_hi": HIST_EXP_HI,
                      "bins_per_octave": 1 << HIST_MANT_BITS, "bins": HIST_BINS,
                      "edges": "_hist_edges_abs in stats.safetensors (|x| bins, bin 0 = tiny)"},
        "percentiles": list(PERCENTILES),
        "stats_file": stats_path.name,
        "stats_sha256": sha256_file(stats_path),
        "totals": {"layers": len(rows), "params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows)},
        "layers": rows,
        "skipped": skipped,
    }
    json_path = Path(out_dir) / "profile.json"
    atomic_write_json(json_path, doc)
    return json_path, stats_path


def run_profile(ctx, cfg: ProfileConfig):
    """The `profile` stage through the resumable skeleton; returns a StageResult (value: the model)."""
    from diffpro_cli.sampling import parse_timesteps

    ui = ctx.ui
    validate_config(cfg)
    model = ctx.model()
    n_steps = len(parse_timesteps(cfg.timesteps, model.num_train_timesteps))
    out_dir = ctx.workdir / "profile"
    outputs = {"profile": out_dir / "profile.json", "stats": out_dir / "stats.safetensors"}

    def compute():
        if model.untrained:
            ui.warn(f"{model.spec} is UNTRAINED (seeded random weights): its statistics describe no trained network")
        if model.random_weights:
            ui.warn(f"{model.spec} has RANDOM weights: use its profile for speed and memory only")
        with ui.progress("profiling", total=cfg.samples * n_steps) as advance:
            write_profile(model, cfg, out_dir, ui, advance)

    result = ctx.run_stage("profile", {"model": ctx.model_record(model)}, cfg.as_dict(), outputs, compute, seed=cfg.seed)
    result.value = model
    return result


def resolve_profile_path(path: str | Path) -> Path:
    """A profile directory or its profile.json → the profile.json path."""
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    if not path.exists():
        raise InputError(f"{path}: no profile here; run `diffpro profile MODEL` first or pass the profile directory")
    return path


def load_profile(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(profile.json, stats tensors, profile.json path); checks the schema and the stats file hash."""
    from diffpro_cli.artifacts import load_safetensors, read_json, sha256_file

    json_path = resolve_profile_path(path)
    doc = read_json(json_path, SCHEMA)
    stats_path = json_path.parent / doc.get("stats_file", "stats.safetensors")
    if not stats_path.exists():
        raise InputError(f"{stats_path}: missing next to {json_path.name}; re-run `diffpro profile`")
    if sha256_file(stats_path) != doc.get("stats_sha256"):
        raise InputError(f"{stats_path}: does not match {json_path.name} (modified or from another run); re-run `diffpro profile --force`")
    tensors, meta = load_safetensors(stats_path)
    if meta.get("diffpro_schema") != SCHEMA:
        raise InputError(f"{stats_path}: not a {SCHEMA} stats file; re-run `diffpro profile --force`")
    return doc, tensors, json_path
