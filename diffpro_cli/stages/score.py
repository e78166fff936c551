"""score: DiffPro's manifold-aware layer sensitivity from a profile, optionally validated by measurement.

Per layer (definitions, and why each open choice was made: docs/sensitivity.md):
  k95, k95_over_d    principal components for `variance` (95%) of the input variance; over d
  pca_sensitivity    1 - erank/d (erank = exp(entropy of the normalised spectrum)); or `top1` (λ1/Σλ)
                     or `participation` (1 - (Σλ)²/Σλ²/d); 0 = isotropic, → 1 = one direction
  log10_energy       log10 of the mean over GEMM rows (tokens / patches) of Σ_j x_j²
  range_variability  coefficient of variation over timesteps of the per-timestep |x|max
  combined_score     Σ_c w_c · z_c, z_c = component standardised over the model's layers
                     (default w: pca +1, energy +1, k95/d -1, range +1)
  cdf, rank          empirical CDF of the score over layers (fraction ≤), rank 1 = most sensitive

`--formula taylor` replaces the combined score by log10 of a first-order estimate of the relative
error of the noise prediction when that one layer gets low-bit weights (one backward pass per
batch for all layers; needs the model). `--measure` quantises one layer at a time for real and
reports Spearman ρ between every signal and the measured error.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffpro_cli.errors import InputError, UsageError

SCHEMA = "diffpro.scores/1"
COMPONENTS = ("pca_sensitivity", "log10_energy", "k95_over_d", "range_variability")
PCA_METRICS = ("erank", "top1", "participation")
FORMULAS = ("diffpro", "taylor")
NORMALIZATIONS = ("zscore", "rank")
DEFAULT_WEIGHTS = {"pca_sensitivity": 1.0, "log10_energy": 1.0, "k95_over_d": -1.0, "range_variability": 1.0}
WEIGHT_ALIASES = {"pca": "pca_sensitivity", "energy": "log10_energy", "k95": "k95_over_d", "range": "range_variability"}
FIGURES = ("score_pca_spectra", "score_activation_timesteps", "score_energy_vs_pca", "score_cdf")


@dataclass
class ScoreConfig:
    formula: str = "diffpro"
    pca_metric: str = "erank"
    variance: float = 0.95
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    bits: list[int] = field(default_factory=lambda: [4, 8])   # measured / estimated weight bit widths
    measure: bool = False
    taylor: bool = False          # estimate per-layer errors (implied by --measure and --formula taylor)
    calib_samples: int = 4        # calibration inputs for --measure and --formula taylor:
    calib_timesteps: int = 8      # the profile's first samples at evenly spread profile timesteps
    probes: int = 2
    normalize: str = "zscore"     # how components are put on one scale before weighting: zscore | rank
    group_size: int | None = None
    act_mode: str = "dynamic"     # --measure: activation scheme whose 8-bit input error is measured
    figures: bool = True
    figure_layer: str | None = None
    top: int = 8

    @property
    def needs_model(self) -> bool:
        return self.measure or self.taylor or self.formula == "taylor"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_weights(text: str) -> dict:
    """'pca=1,energy=1,k95=-1,range=0.5' → component weights (components not named keep their default)."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in (p for p in text.split(",") if p.strip()):
        key, _, value = part.partition("=")
        key = WEIGHT_ALIASES.get(key.strip(), key.strip())
        if key not in weights or not value.strip():
            raise UsageError(f"--component-weights {text!r}: use NAME=NUMBER pairs with names pca, energy, k95, range")
        try:
            weights[key] = float(value)
        except ValueError:
            raise UsageError(f"--component-weights {text!r}: {value.strip()!r} is not a number") from None
    return weights


def validate_config(cfg: ScoreConfig) -> None:
    if cfg.formula not in FORMULAS:
        raise UsageError(f"--formula {cfg.formula}: unknown; choose {' or '.join(FORMULAS)}")
    if cfg.normalize not in NORMALIZATIONS:
        raise UsageError(f"--normalize {cfg.normalize}: unknown; choose zscore or rank")
    if cfg.pca_metric not in PCA_METRICS:
        raise UsageError(f"--pca-metric {cfg.pca_metric}: unknown; choose one of {', '.join(PCA_METRICS)}")
    if not 0 < cfg.variance < 1:
        raise UsageError(f"--variance {cfg.variance}: must be a fraction in (0, 1), e.g. 0.95")
    if not cfg.bits or any(b < 2 or b > 8 for b in cfg.bits):
        raise UsageError("--bits: give weight bit widths between 2 and 8, e.g. --bits 4,8")
    if min(cfg.calib_samples, cfg.calib_timesteps, cfg.probes, cfg.top) < 1:
        raise UsageError("--calib-samples, --calib-timesteps, --probes and --top must be at least 1")
    if cfg.group_size is not None and cfg.group_size < 1:
        raise UsageError("--group-size must be a positive number of input channels, e.g. 64")
    from diffpro_cli.quant.kernels import ACT_MODES

    if cfg.act_mode not in ACT_MODES:
        raise UsageError(f"--act-mode {cfg.act_mode}: unknown; choose one of {', '.join(ACT_MODES)}")


# ---------------------------------------------------------------------------------------------
# Components (from the profile alone)
# ---------------------------------------------------------------------------------------------


def k_for_variance(eigvals: torch.Tensor, fraction: float = 0.95) -> int:
    """Smallest k whose top-k eigenvalues explain `fraction` of the total (0 for a zero spectrum)."""
    lam = eigvals.double().clamp_min(0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0:
        return 0
    cum = lam.cumsum(0) / total
    k = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=torch.float64) - 1e-12)) + 1
    return min(k, lam.numel())


def dimension_ratio(count: float, width: int, d: int) -> float:
    """count/d for a spectrum of full width d; for a CountSketch of width < d, an estimate of it.

    A sketch keeps the COUNT of a concentrated spectrum (count ≪ width) but the RATIO of a spread one;
    with r = count/width the estimate (1 - r)·count/d + r·r moves between the two (= count/d when width
    = d). Error on synthetic spectra, d = 4608 → 2048: ≤ 0.05 (docs/sensitivity.md).
    """
    if width <= 0 or d <= 0:
        return 0.0
    r = min(count / width, 1.0)
    return (1 - r) * count / d + r * r


def pca_sensitivity(eigvals: torch.Tensor, metric: str = "erank", d: int | None = None) -> float:
    """A scalar in [0, 1) from the spectrum: 0 = isotropic, → 1 = all variance along one direction.

    erank: 1 - exp(entropy of λ/Σλ)/d; participation: 1 - (Σλ)²/Σλ²/d; top1: λ1/Σλ. `d` is the true input
    width when `eigvals` come from a narrower sketch.
    """
    lam = eigvals.double().clamp_min(0)
    width = lam.numel()
    d = d or width
    total = float(lam.sum())
    if total <= 0 or width == 0:
        return 0.0
    p = lam / total
    if metric == "top1":
        return float(p.max())
    if metric == "participation":
        return 1.0 - dimension_ratio(float(1.0 / p.square().sum()), width, d)
    nz = p[p > 0]
    return 1.0 - dimension_ratio(math.exp(float(-(nz * nz.log()).sum())), width, d)


def explained_variance(eigvals: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio of a descending spectrum."""
    lam = eigvals.double().clamp_min(0)
    total = float(lam.sum())
    return lam.cumsum(0) / total if total > 0 else torch.zeros_like(lam)


def range_variability(ts_absmax: torch.Tensor, ts_rows: torch.Tensor) -> float:
    """Coefficient of variation of the per-timestep |x|max over the timesteps the layer ran at."""
    a = ts_absmax[ts_rows > 0].double()
    if a.numel() < 2 or float(a.mean()) <= 0:
        return 0.0
    return float(a.std(unbiased=False) / a.mean())


def layer_components(tensors: dict, name: str, d: int, cfg: ScoreConfig) -> dict:
    """The paper's four signals for one layer (d = its true input width)."""
    lam = tensors[f"{name}/pca_eigvals"]
    rows = tensors[f"{name}/ts_rows"].double()
    ratio = dimension_ratio(k_for_variance(lam, cfg.variance), lam.numel(), d)
    energy = float((tensors[f"{name}/ts_energy"] * rows).sum() / rows.sum().clamp_min(1))
    return {
        "k95": round(ratio * d),
        "k95_over_d": ratio,
        "pca_sensitivity": pca_sensitivity(lam, cfg.pca_metric, d),
        "log10_energy": math.log10(max(energy, 1e-30)),
        "range_variability": range_variability(tensors[f"{name}/ts_absmax"], tensors[f"{name}/ts_rows"]),
    }


def zscores(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    if sd <= 0 or not math.isfinite(sd):
        return [0.0] * len(values)
    return ((t - t.mean()) / sd).tolist()


def rank_scores(values: list[float]) -> list[float]:
    """Mid-rank percentiles in (0, 1): ties share their average rank."""
    from scipy.stats import rankdata

    n = len(values)
    return [(float(r) - 0.5) / n for r in rankdata(values)] if n else []


def combined_scores(comps: dict[str, dict], weights: dict, normalize: str = "zscore") -> dict[str, float]:
    """Σ_c w_c · norm_c over layers, norm = z-score (default) or rank percentile of the component."""
    names = list(comps)
    norm = zscores if normalize == "zscore" else rank_scores
    total = [0.0] * len(names)
    for c in COMPONENTS:
        w = weights.get(c, 0.0)
        if w:
            z = norm([comps[n][c] for n in names])
            total = [a + w * b for a, b in zip(total, z)]
    return dict(zip(names, total))


def cdf_and_rank(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """Empirical CDF (fraction of layers with score ≤ s) and rank (1 = highest; ties in layer order)."""
    values = sorted(scores.values())
    cdf = {k: bisect.bisect_right(values, v) / len(values) for k, v in scores.items()}
    order = sorted(scores, key=lambda k: -scores[k])
    return cdf, {k: i + 1 for i, k in enumerate(order)}


# ---------------------------------------------------------------------------------------------
# Calibration inputs, measured and estimated single-layer errors
# ---------------------------------------------------------------------------------------------


def pick_timesteps(timesteps: list[int], k: int) -> list[int]:
    """k of the timesteps, evenly spread (all of them when k ≥ len)."""
    if k >= len(timesteps):
        return list(timesteps)
    idx = torch.linspace(0, len(timesteps) - 1, k).round().long().tolist()
    return [timesteps[i] for i in sorted(set(idx))]


@torch.no_grad()
def calibration_set(model, profile_doc: dict, n_samples: int, n_timesteps: int):
    """(x_t, t, y, timesteps, n) of the profile's first n samples at evenly spread profile timesteps.

    Sample i depends only on (seed, i, label, timesteps), so these are the inputs the profile saw.
    """
    from diffpro_cli.sampling import SamplerConfig, sample
    from diffpro_cli.stages.profile import calibration_labels

    cal = profile_doc["calibration"]
    ts = list(cal["timesteps"])
    n = min(n_samples, int(cal["samples"]))
    keep = set(pick_timesteps(ts, n_timesteps))
    labels = calibration_labels(model, int(cal["samples"]), cal.get("classes"))
    labels = labels[:n] if labels is not None else None
    batch = int(cal["batch"])
    xs, tt, ys = [], [], []
    calls = [0]

    def on_step(t, x, eps):
        b = calls[0] // len(ts)
        calls[0] += 1
        if t in keep:
            xs.append(x.clone())
            tt.append(torch.full((x.shape[0],), int(t), dtype=torch.long))
            if labels is not None:
                ys.append(labels[b * batch: b * batch + x.shape[0]])

    sampler = SamplerConfig(method=cal["sampler"]["method"], cfg_scale=cal["sampler"]["cfg_scale"])
    sample(model, n, ts, sampler, labels=labels, seed=int(cal["seed"]), batch_size=batch, on_step=on_step, decode=False)
    from diffpro_cli.models.conditioning import cat_conditions

    y = cat_conditions(ys) if labels is not None else None   # labels, or a Conditioning (embedding models)
    return torch.cat(xs), torch.cat(tt), y, sorted(keep), n


@torch.no_grad()
def _eps_all(model, x, t, y, batch: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], batch):
        outs.append(model.eps(x[s:s + batch], t[s:s + batch], y[s:s + batch] if y is not None else None))
    return torch.cat(outs)


def _group(w: torch.Tensor, group_size: int | None) -> int | None:
    return group_size if group_size and w[0].numel() % group_size == 0 else None


@torch.no_grad()
def measure_layer_errors(model, names: list[str], x, t, y, bits: list[int], group_size: int | None = None,
                         batch: int = 16, advance=lambda n=1: None) -> dict[str, dict[str, float]]:
    """Σ‖eps_q - eps‖² / Σ‖eps‖² when ONE layer's weights are fake-quantised, per layer and bit width."""
    from diffpro_cli.quant.reference import fake_quant_weight

    layers = model.quantizable_layers()
    ref = _eps_all(model, x, t, y, batch)
    denom = float(ref.double().square().sum()) or 1.0
    result = {}
    for name in names:
        mod = layers[name][0]
        original = mod.weight.data.clone()
        per_bits = {}
        for b in bits:
            mod.weight.data.copy_(fake_quant_weight(original, b, _group(original, group_size)))
            try:
                out = _eps_all(model, x, t, y, batch)
            finally:
                mod.weight.data.copy_(original)
            per_bits[str(b)] = float((out - ref).double().square().sum()) / denom
            advance(1)
        result[name] = per_bits
    return result


@torch.no_grad()
def measure_act_errors(model, names: list[str], x, t, y, act_mode: str = "dynamic", batch: int = 16,
                       advance=lambda n=1: None) -> dict[str, dict[str, float]]:
    """Σ‖eps_q - eps‖² / Σ‖eps‖² when ONE layer's INPUT is quantised exactly as its CPU integer kernel
    quantises it (the kernel's own scheme and grid, weights kept float), per layer → {act bits: error}
    for each input grid the kernels use at 4- and 8-bit weights: "8" with VNNI, "7" without
    (quant/kernels.py::cpu_act_qmax). Why: a layer's activation error has nothing to do with its weight
    error (a patch embedding sees x_t itself), so the allocator should not reuse the weight curve for it.
    Static mode is measured with one range per call: its calibrated ranges do not exist yet."""
    from diffpro_cli.quant.kernels import act_bits_of
    from diffpro_cli.quant.layers import quantize_module

    layers = model.quantizable_layers()
    ref = _eps_all(model, x, t, y, batch)
    denom = float(ref.double().square().sum()) or 1.0
    mode = "dynamic" if act_mode == "static" else act_mode
    result = {}
    for name in names:
        result[name] = {}
        for weight_bits in (4, 8):   # the two activation grids the CPU kernels use (identical with VNNI)
            probe = quantize_module(layers[name][0], weight_bits, act_bits=8, act_mode=mode)
            kernel = probe._kernel
            scheme, qmax = kernel.act_scheme(probe), kernel.act_qmax
            del probe
            key = "8" if qmax is None else str(act_bits_of(qmax))
            if key not in result[name]:
                result[name][key] = _act_error(model, layers[name][0], x, t, y, ref, denom, batch, scheme, qmax,
                                               getattr(kernel, "reduce_range", False))
        advance(1)
    return result


def _act_error(model, mod, x, t, y, ref, denom, batch, scheme, qmax, reduce_range) -> float:
    """Relative eps error with `mod`'s input fake-quantised on the kernel's grid (0 for float kernels)."""
    from diffpro_cli.quant.reference import reference_activation

    if scheme == "float" or qmax is None:   # a kernel with float activations adds no error
        return 0.0

    def quantise_input(module, inputs, scheme=scheme, qmax=qmax, reduce_range=reduce_range):
        x_in = inputs[0]
        flat = x_in if scheme == "sample" else x_in.reshape(-1, x_in.shape[-1])
        x_hat = reference_activation(flat, scheme, qmax, None, reduce_range)[0]
        return (x_hat.to(x_in.dtype).reshape(x_in.shape), *inputs[1:])

    handle = mod.register_forward_pre_hook(quantise_input)
    try:
        out = _eps_all(model, x, t, y, batch)
    finally:
        handle.remove()
    return float((out - ref).double().square().sum()) / denom


def _layer_delta(module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """The change of the layer's output when its weight changes by dw (bias unchanged)."""
    if isinstance(module, torch.nn.Conv2d):
        return module._conv_forward(x, dw, None)
    return torch.nn.functional.linear(x, dw)


def taylor_layer_errors(model, names: list[str], x, t, y, bits: list[int], group_size: int | None = None,
                        batch: int = 16, probes: int = 2, seed: int = 0, advance=lambda n=1: None) -> dict[str, dict[str, float]]:
    """First-order estimate of `measure_layer_errors` for every layer at once.

    eps changes by J_l Δy_l when layer l's output changes by Δy_l = ΔW_l x_l. With a Gaussian probe r per
    sample, E_r[(rᵀ J_l Δy_l)²] = ‖J_l Δy_l‖², and rᵀ J_l = ∂(rᵀ eps)/∂y_l comes from ONE backward pass
    for all layers. Cost: probes × (forward + backward) per batch, plus one extra GEMM per layer and bit
    width, instead of one forward per layer and bit width.
    """
    from diffpro_cli.quant.reference import fake_quant_weight

    table = model.quantizable_layers()
    modules = {n: table[n][0] for n in names}
    num = {n: {b: 0.0 for b in bits} for n in names}
    den = 0.0
    gen = torch.Generator().manual_seed(seed)
    saved = [(p, p.requires_grad) for p in model.net.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        for s in range(0, x.shape[0], batch):
            xb, tb = x[s:s + batch], t[s:s + batch]
            yb = y[s:s + batch] if y is not None else None
            n = xb.shape[0]
            for _ in range(probes):
                records = []

                def hook(mod, args, out, name):
                    z = torch.zeros_like(out, requires_grad=True)
                    records.append((name, mod, args[0].detach(), z))
                    return out + z

                handles = [m.register_forward_hook(lambda m, a, o, name=nm: hook(m, a, o, name)) for nm, m in modules.items()]
                try:
                    with torch.enable_grad():
                        eps = model.eps(xb, tb, yb)
                        r = torch.randn(eps.shape, generator=gen)
                        grads = torch.autograd.grad((eps * r).sum(), [z for *_, z in records], allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                den += float(eps.detach().double().square().sum()) / probes
                acc = {}
                with torch.no_grad():
                    for (name, mod, xin, _), g in zip(records, grads):
                        if g is None:
                            continue
                        w = mod.weight.detach()
                        for b in bits:
                            dy = _layer_delta(mod, xin, fake_quant_weight(w, b, _group(w, group_size)) - w)
                            v = (g * dy).reshape(n, -1).sum(1) if dy.shape[0] == n else (g * dy).sum().reshape(1)
                            acc[(name, b)] = acc.get((name, b), 0) + v.double()
                for (name, b), v in acc.items():
                    num[name][b] += float(v.square().sum()) / probes
                del records, grads
            advance(n)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    den = den or 1.0
    return {n: {str(b): num[n][b] / den for b in bits} for n in names}


def spearman(a: list[float], b: list[float]) -> dict:
    """Spearman ρ and its two-sided p-value (None when undefined)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return {"rho": None, "p": None}
    res = spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else round(rho, 4), "p": None if math.isnan(p) else float(f"{p:.3g}")}


def validation_report(layers: dict[str, dict], bits: list[int]) -> dict:
    """Spearman ρ between each signal and the measured error, per bit width."""
    names = list(layers)
    out = {}
    for b in bits:
        measured = [layers[n]["measured_error"][str(b)] for n in names]
        signals = {s: [layers[n][s] for n in names] for s in ("combined_score",) + COMPONENTS}
        if all("taylor_error" in layers[n] for n in names):
            signals["taylor_error"] = [layers[n]["taylor_error"][str(b)] for n in names]
        out[str(b)] = {s: spearman(v, measured) for s, v in signals.items()}
    return out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _round(v):
    return float(f"{v:.6g}") if isinstance(v, float) else v


def score_layers(profile_doc: dict, tensors: dict, cfg: ScoreConfig, taylor: dict | None = None) -> dict[str, dict]:
    """The per-layer entries of scores.json (measured errors are added by the caller)."""
    rows = {r["name"]: r for r in profile_doc["layers"]}
    missing = [n for n in rows if f"{n}/pca_eigvals" not in tensors]
    if missing:
        raise InputError(f"profile stats lack layer {missing[0]}; re-run `diffpro profile --force`")
    comps = {n: layer_components(tensors, n, int(r["in_features"]), cfg) for n, r in rows.items()}
    if cfg.formula == "taylor":
        low = str(min(cfg.bits))
        combined = {n: math.log10(max(taylor[n][low], 1e-30)) for n in rows}
    else:
        combined = combined_scores(comps, cfg.weights, cfg.normalize)
    cdf, rank = cdf_and_rank(combined)
    layers = {}
    for n, r in rows.items():
        layers[n] = {
            "role": r["role"], "kind": r["kind"], "in_features": r["in_features"], "out_features": r["out_features"],
            "params": r["params"], "macs": r["macs"], "pca_width": r["pca_width"], "pca_method": r["pca_method"],
            **{k: _round(v) for k, v in comps[n].items()},
            "combined_score": _round(combined[n]), "cdf": _round(cdf[n]), "rank": rank[n],
        }
        if taylor is not None:
            layers[n]["taylor_error"] = {b: _round(v) for b, v in taylor[n].items()}
            layers[n]["output_error_proxy"] = _round(math.log10(max(taylor[n][str(min(cfg.bits))], 1e-30)))
    return layers


def score_definition(cfg: ScoreConfig) -> str:
    if cfg.formula == "taylor":
        return (f"log10 of the first-order estimate of the relative MSE of eps with this layer at {min(cfg.bits)}-bit "
                f"weights ({cfg.probes} probes, {cfg.calib_samples} samples x {cfg.calib_timesteps} timesteps)")
    terms = " ".join(f"{'+' if w >= 0 else '-'} {abs(w):g}*z({c})" for c, w in cfg.weights.items() if w)
    norm = "z-score" if cfg.normalize == "zscore" else "rank percentile"
    terms = terms.lstrip("+ ").replace("z(", "n(")
    return f"sum over components of weight x {norm} n() across layers: {terms}; pca_sensitivity = {cfg.pca_metric}"


def write_scores(profile_path: Path, cfg: ScoreConfig, workdir: Path, model=None, ui=None) -> Path:
    """Compute workdir/scores.json (and figures) from the profile at profile_path."""
    from diffpro_cli.artifacts import atomic_write_json, sha256_file
    from diffpro_cli.console import QUIET_UI
    from diffpro_cli.stages.profile import load_profile

    ui = ui or QUIET_UI
    doc, tensors, json_path = load_profile(profile_path)
    names = [r["name"] for r in doc["layers"]]
    taylor = calib = None
    if cfg.needs_model:
        x, t, y, ts, n = calib = calibration_set(model, doc, cfg.calib_samples, cfg.calib_timesteps)
        batch = int(doc["calibration"]["batch"])
        with ui.progress("estimating (taylor)", total=x.shape[0]) as advance:
            taylor = taylor_layer_errors(model, names, x, t, y, cfg.bits, cfg.group_size, batch=batch,
                                         probes=cfg.probes, seed=int(doc["calibration"]["seed"]), advance=advance)
    layers = score_layers(doc, tensors, cfg, taylor)
    result = {
        "schema": SCHEMA,
        "model": {"spec": doc["model"]["spec"], "sha256": doc["model"].get("sha256"),
                  "random_weights": doc["model"].get("random_weights", False), "untrained": doc["model"].get("untrained", False)},
        "profile": str(json_path),
        "profile_sha256": sha256_file(json_path),
        "formula": cfg.formula,
        "score_definition": score_definition(cfg),
        "config": cfg.as_dict() | ({"proxy_bits": min(cfg.bits)} if taylor is not None else {}),
        "layers": layers,
    }
    if calib is not None:
        x, t, y, ts, n = calib
        result["calibration"] = {"samples": n, "timesteps": ts, "inputs": int(x.shape[0]), "bits": cfg.bits,
                                 "weights": "symmetric per output channel" + (f", groups of {cfg.group_size}" if cfg.group_size else "")}
    if cfg.measure:
        x, t, y, ts, n = calib
        batch = int(doc["calibration"]["batch"])
        with ui.progress("measuring", total=len(names) * (len(cfg.bits) + 1)) as advance:
            errors = measure_layer_errors(model, names, x, t, y, cfg.bits, cfg.group_size, batch=batch, advance=advance)
            act_errors = measure_act_errors(model, names, x, t, y, cfg.act_mode, batch=batch, advance=advance)
        for name in names:
            layers[name]["measured_error"] = {b: _round(v) for b, v in errors[name].items()}
            layers[name]["measured_act_error"] = {b: _round(v) for b, v in act_errors[name].items()}
        result["validation"] = {"metric": "relative MSE of the noise prediction (sum over calibration inputs), one layer quantised",
                                "spearman": validation_report(layers, cfg.bits)}
    if cfg.figures:
        result["figures"] = [str(p) for p in write_figures(doc, tensors, result, Path(workdir) / "figures", cfg)]
        stale = Path(workdir) / "figures" / "score_measured.png"
        if not cfg.measure and stale.exists():
            stale.unlink()  # from an earlier --measure run: it would not match these scores
    out = Path(workdir) / "scores.json"
    atomic_write_json(out, result)
    return out


def figure_paths(fig_dir: Path, cfg: ScoreConfig) -> dict[str, Path]:
    names = list(FIGURES) + (["score_measured"] if cfg.measure else [])
    return {n: Path(fig_dir) / f"{n}.png" for n in names}


def write_figures(doc: dict, tensors: dict, result: dict, fig_dir: Path, cfg: ScoreConfig) -> list[Path]:
    """The PNG figures next to scores.json (see figure_paths)."""
    import numpy as np

    from diffpro_cli.plots import ecdf_on, heatmap_on, lines_on, new_figure, save_figure, scatter_on
    from diffpro_cli.stages.profile import hist_magnitude_edges, magnitude_hist

    layers = result["layers"]
    paths = figure_paths(fig_dir, cfg)
    by_rank = sorted(layers, key=lambda n: layers[n]["rank"])
    spec = result["model"]["spec"] + (" (UNTRAINED)" if result["model"]["untrained"] else "")
    spec += " (RANDOM WEIGHTS)" if result["model"]["random_weights"] else ""

    fig, ax = new_figure()
    series = []
    for n in by_rank[: cfg.top]:
        ev = explained_variance(tensors[f"{n}/pca_eigvals"]).numpy()
        series.append((np.arange(1, len(ev) + 1), ev, f"#{layers[n]['rank']} {n}"))
    lines_on(ax, series, title=f"PCA explained variance, top {len(series)} sensitive layers - {spec}",
             xlabel="principal components k", ylabel="cumulative explained variance", logx=True, hline=cfg.variance)
    save_figure(fig, paths["score_pca_spectra"])

    name = cfg.figure_layer or by_rank[0]
    ts = tensors["_timesteps"].tolist()
    hist = magnitude_hist(tensors[f"{name}/ts_hist"]).double()[:, 1:]      # drop the |x| < 2^-20 bin
    dens = hist / hist.sum(1, keepdim=True).clamp_min(1)
    edges = hist_magnitude_edges()[1:].numpy()
    x_edges = np.arange(len(ts) + 1) - 0.5
    fig, ax = new_figure(width=7.2)
    heatmap_on(ax, x_edges, edges, dens.T.numpy(), title=f"|x| distribution over timesteps: {name}",
               xlabel="timestep", ylabel="|activation|", logy=True, color_label="fraction of values")
    pct = tensors[f"{name}/ts_percentiles"].numpy()
    ax.plot(np.arange(len(ts)), tensors[f"{name}/ts_absmax"].numpy(), color="cyan", linewidth=1, label="|x| max")
    ax.plot(np.arange(len(ts)), pct[:, 3], color="white", linewidth=1, linestyle="--", label="p99.9")
    ax.plot(np.arange(len(ts)), pct[:, 0], color="white", linewidth=1, linestyle=":", label="p50")
    peak = float(tensors[f"{name}/ts_absmax"].max())
    median = pct[:, 0][pct[:, 0] > 0]
    low = float(median.min()) / 1e3 if median.size else peak / 1e6
    if peak > 0:
        ax.set_ylim(max(low, float(edges[0])), peak * 2)
    step = max(1, len(ts) // 10)
    ax.set_xticks(list(range(0, len(ts), step)), [str(ts[i]) for i in range(0, len(ts), step)])
    ax.legend(fontsize=7, loc="lower left", framealpha=0.5)
    save_figure(fig, paths["score_activation_timesteps"])

    fig, ax = new_figure()
    names = list(layers)
    k = np.array([layers[n]["k95_over_d"] for n in names])
    scatter_on(ax, [layers[n]["pca_sensitivity"] for n in names], [layers[n]["log10_energy"] for n in names],
               sizes=10 + 200 * k, colors=k, color_label="k95 / d",
               annotate=[n if layers[n]["rank"] <= 5 else "" for n in names],
               title=f"activation energy vs PCA sensitivity ({cfg.pca_metric}) - {spec}",
               xlabel="PCA sensitivity", ylabel="log10 mean Σx²")
    save_figure(fig, paths["score_energy_vs_pca"])

    fig, ax = new_figure()
    ecdf_on(ax, [layers[n]["combined_score"] for n in names], title=f"CDF of the {cfg.formula} score over layers - {spec}",
            xlabel="score")
    save_figure(fig, paths["score_cdf"])

    if cfg.measure:
        b = str(min(cfg.bits))
        meas = [math.log10(max(layers[n]["measured_error"][b], 1e-30)) for n in names]
        panels = [("combined_score", [layers[n]["combined_score"] for n in names], f"{cfg.formula} score")]
        if "taylor_error" in layers[names[0]] and cfg.formula != "taylor":
            panels.append(("taylor_error", [math.log10(max(layers[n]["taylor_error"][b], 1e-30)) for n in names],
                           "log10 taylor estimate"))
        fig, axes = new_figure(1, len(panels))
        for ax, (key, values, label) in zip(np.atleast_1d(axes), panels):
            rho = result["validation"]["spearman"][b][key]["rho"]
            scatter_on(ax, values, meas, title=f"{label} vs measured ({b}-bit weights): Spearman ρ = {rho}",
                       xlabel=label, ylabel="log10 measured relative MSE of eps")
        save_figure(fig, paths["score_measured"])
    return list(paths.values())


def load_profiled_model(doc: dict, ctx):
    """The model for --measure / --formula taylor: the context's model, refused if it is not the profiled one."""
    profiled = doc["model"]
    # the profiled network: random / untrained weights are drawn from the profile's seed, not this run's
    model = ctx.load(seed=int(doc["calibration"]["seed"]))
    same = model.describe()
    if (profiled.get("sha256") or same["sha256"]) and profiled.get("sha256") != same["sha256"] \
            or bool(profiled.get("untrained")) != bool(same["untrained"]) or profiled.get("params") != same["params"]:
        raise InputError(f"{ctx.model_spec}: is not the profiled model ({profiled['spec']}); re-run `diffpro profile` on it, or pass --model with the profiled one")
    return model


def run_score(ctx, cfg: ScoreConfig, *, profile_path: str | Path | None = None):
    """The `score` stage through the resumable skeleton; returns a StageResult (value: the scores.json path).

    The context's model spec may be empty (`diffpro score` without --model): the profiled model's spec is
    used then, loaded with the context's trust flag and weights."""
    from diffpro_cli.artifacts import input_record, read_json
    from diffpro_cli.stages.profile import SCHEMA as PROFILE_SCHEMA, resolve_profile_path

    ui = ctx.ui
    validate_config(cfg)
    json_path = resolve_profile_path(profile_path if profile_path is not None else ctx.workdir / "profile")
    doc = read_json(json_path, PROFILE_SCHEMA)
    names = [r["name"] for r in doc["layers"]]
    if cfg.figure_layer is not None and cfg.figure_layer not in names:
        raise UsageError(f"--layer {cfg.figure_layer}: not a profiled layer; see the names in {json_path}")
    stats_path = json_path.parent / doc.get("stats_file", "stats.safetensors")
    if not stats_path.exists():
        raise InputError(f"{stats_path}: missing next to {json_path.name}; re-run `diffpro profile`")
    inputs = {"profile": input_record(json_path), "stats": input_record(stats_path)}
    model = None
    if cfg.needs_model:
        if not ctx.model_spec:
            ctx.model_spec = doc["model"]["spec"]
        model = load_profiled_model(doc, ctx)
        inputs["model"] = ctx.model_record(model)
    workdir = ctx.workdir
    out = workdir / "scores.json"
    outputs = {"scores": out, **(figure_paths(workdir / "figures", cfg) if cfg.figures else {})}
    result = ctx.run_stage("score", inputs, cfg.as_dict(), outputs, lambda: write_scores(json_path, cfg, workdir, model, ui),
                           seed=int(doc["calibration"]["seed"]))
    result.value = out
    return result
