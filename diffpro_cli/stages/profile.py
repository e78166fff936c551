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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.stages.profile_stats import (
    HIST_BINS,
    HIST_EXP_HI,
    HIST_EXP_LO,
    HIST_MANT_BITS,
    PERCENTILES,
    LayerStats,
    hist_magnitude_edges,
    input_dim,
    layer_input_matrix,
    layer_seed,
    output_dim,
)

SCHEMA = "diffpro.profile/1"


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
        if x.device.type != "cpu":   # a network on a GPU: statistics accumulate on the CPU (float64 sums, sketch)
            x = x.cpu()
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
        self.out_sumsq[name][self.ti] += float(out.float().square().sum(dtype=torch.float64))

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
    from diffpro_cli.sampling import check_guidance

    if cfg.samples < 1 or cfg.batch < 1:
        raise UsageError("--samples and --batch must be at least 1")
    if cfg.max_dim < 2 or cfg.max_rows < 2:
        raise UsageError("--max-dim and --max-rows must be at least 2")
    if cfg.method not in ("ddim", "ddpm"):
        raise UsageError(f"--method {cfg.method}: unknown sampler; use ddim or ddpm")
    check_guidance(cfg.cfg_scale)


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
        if model.is_quantized:
            raise InputError(f"{model.spec}: is a diffpro quantized checkpoint (its layers are integer already); "
                             f"profile the float model it was made from")
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


def write_profile(model, cfg: ProfileConfig, out_dir: Path, ui=None, advance=lambda n=1: None,
                  inputs_sha256: str | None = None) -> tuple[Path, Path]:
    """Profile `model` and write out_dir/stats.safetensors and out_dir/profile.json atomically.
    `inputs_sha256`: the run's model record hash (the model with its conditioning: StageContext.model_record),
    which score --measure compares so that it never measures on prompts other than the profiled ones."""
    from diffpro_cli.artifacts import atomic_save_safetensors, atomic_write_json, sha256_file
    from diffpro_cli.checkpoint import non_layer_bytes

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
        # what a quantized checkpoint stores besides these layers (allocate's size budgets count it)
        "checkpoint_other_bytes": non_layer_bytes(model, [r["name"] for r in rows]),
        "layers": rows,
        "skipped": skipped,
        **({"inputs_sha256": inputs_sha256} if inputs_sha256 else {}),
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
    calibration_labels(model, cfg.samples, cfg.classes)   # a bad --classes fails here, not after "recomputing"
    out_dir = ctx.workdir / "profile"
    outputs = {"profile": out_dir / "profile.json", "stats": out_dir / "stats.safetensors"}

    def compute():
        if model.untrained:
            ui.warn(f"{model.spec} is UNTRAINED (seeded random weights): its statistics describe no trained network")
        if model.random_weights:
            ui.warn(f"{model.spec} has RANDOM weights: use its profile for speed and memory only")
        with ui.progress("profiling", total=cfg.samples * n_steps) as advance:
            write_profile(model, cfg, out_dir, ui, advance, inputs_sha256=record["sha256"])

    record = ctx.model_record(model)
    result = ctx.run_stage("profile", {"model": record}, cfg.as_dict(), outputs, compute, seed=cfg.seed)
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


def _row_problem(row) -> str | None:
    """What is wrong with one profile.json layer row (None: nothing score reads is missing or malformed)."""
    if not isinstance(row, dict):
        return f"is not an object ({type(row).__name__})"
    for key in ("name", "role", "kind", "pca_method"):
        if not isinstance(row.get(key), str) or not row.get(key):
            return f"has no {key} text"
    for key, least in (("in_features", 1), ("out_features", 1), ("params", 1), ("macs", 0), ("pca_width", 1)):
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            return f"has {key} {v!r}, not an integer >= {least}"
    return None


def check_profile_doc(doc: dict, json_path: Path) -> None:
    """The fields of profile.json that score reads, checked once: a hand-edited or damaged file is one
    InputError naming the layer and field, not a KeyError / IndexError traceback half-way through score."""
    def bad(what: str):
        raise InputError(f"{json_path}: {what}, so it is incomplete or hand-edited; re-run `diffpro profile --force`")

    if not doc["layers"]:
        bad("lists no layers")
    seen = set()
    for i, row in enumerate(doc["layers"]):
        problem = _row_problem(row)
        if problem:
            bad(f"layer {row.get('name') if isinstance(row, dict) and isinstance(row.get('name'), str) else f'#{i}'} {problem}")
        if row["name"] in seen:
            bad(f"layer {row['name']} is listed twice")
        seen.add(row["name"])
    if not isinstance(doc["model"].get("spec"), str):
        bad("its model has no spec")
    cal = doc["calibration"]
    for key, least in (("seed", 0), ("batch", 1)):
        v = cal.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            bad(f"its calibration has {key} {v!r}, not an integer >= {least}")


def load_profile(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(profile.json, stats tensors, profile.json path); checks the schema and the stats file hash."""
    from diffpro_cli.artifacts import load_safetensors, read_json, sha256_file

    json_path = resolve_profile_path(path)
    doc = read_json(json_path, SCHEMA)
    check_profile_doc(doc, json_path)
    stats_path = json_path.parent / doc.get("stats_file", "stats.safetensors")
    if not stats_path.exists():
        raise InputError(f"{stats_path}: missing next to {json_path.name}; re-run `diffpro profile`")
    if sha256_file(stats_path) != doc.get("stats_sha256"):
        raise InputError(f"{stats_path}: does not match {json_path.name} (modified or from another run); re-run `diffpro profile --force`")
    tensors, meta = load_safetensors(stats_path)
    if meta.get("diffpro_schema") != SCHEMA:
        raise InputError(f"{stats_path}: not a {SCHEMA} stats file; re-run `diffpro profile --force`")
    return doc, tensors, json_path
