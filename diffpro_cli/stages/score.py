"""score: DiffPro's manifold-aware layer sensitivity from a profile, optionally validated by measurement.

Per layer (definitions and the reasons for each choice: docs/sensitivity.md):
  k95 / d            principal components for `variance` (95%) of the input variance, over d
  pca_sensitivity    1 - erank/d by default (erank = exp(entropy of the normalised spectrum));
                     alternatives `top1` (λ1/Σλ) and `participation` (1 - (Σλ)²/Σλ² / d)
  log10_energy       log10 of the mean over GEMM rows (tokens / patches) of Σ_j x_j²
  range_variability  coefficient of variation over timesteps of the per-timestep |x|max
  combined_score     Σ_c w_c · z_c, z_c the component standardised over the model's layers
  cdf, rank          empirical CDF of the score over layers (fraction ≤), rank 1 = most sensitive

`--formula output-error` replaces the combined score by log10 of the layer's predicted relative
output error under 4-bit weights (from the profile's `wq_err`), which tracks measured error better
(see docs/sensitivity.md for the numbers). `--measure` quantises one layer at a time and reports
Spearman correlations between every signal and the measured relative MSE of the noise prediction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffpro_cli.errors import InputError, UsageError

SCHEMA = "diffpro.scores/1"
COMPONENTS = ("pca_sensitivity", "log10_energy", "k95_over_d", "range_variability")
PCA_METRICS = ("erank", "top1", "participation")
FORMULAS = ("diffpro", "output-error")
DEFAULT_WEIGHTS = {"pca_sensitivity": 1.0, "log10_energy": 1.0, "k95_over_d": 1.0, "range_variability": 1.0}
WEIGHT_ALIASES = {"pca": "pca_sensitivity", "energy": "log10_energy", "k95": "k95_over_d", "range": "range_variability"}


@dataclass
class ScoreConfig:
    formula: str = "diffpro"
    pca_metric: str = "erank"
    variance: float = 0.95
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    proxy_bits: int = 4
    measure: bool = False
    measure_bits: list[int] = field(default_factory=lambda: [4, 8])
    measure_samples: int = 4
    measure_timesteps: int = 8
    group_size: int | None = None
    figures: bool = True
    figure_layer: str | None = None
    top: int = 8

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_weights(text: str) -> dict:
    """'pca=1,energy=1,k95=0,range=0.5' → component weights (unnamed components keep their default)."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in (p for p in text.split(",") if p.strip()):
        key, _, value = part.partition("=")
        key = WEIGHT_ALIASES.get(key.strip(), key.strip())
        if key not in weights or not value:
            raise UsageError(f"--weights {text!r}: use NAME=NUMBER pairs with names pca, energy, k95, range")
        try:
            weights[key] = float(value)
        except ValueError:
            raise UsageError(f"--weights {text!r}: {value!r} is not a number") from None
    return weights


def validate_config(cfg: ScoreConfig) -> None:
    if cfg.formula not in FORMULAS:
        raise UsageError(f"--formula {cfg.formula}: unknown; choose {' or '.join(FORMULAS)}")
    if cfg.pca_metric not in PCA_METRICS:
        raise UsageError(f"--pca-metric {cfg.pca_metric}: unknown; choose one of {', '.join(PCA_METRICS)}")
    if not 0 < cfg.variance < 1:
        raise UsageError(f"--variance {cfg.variance}: must be a fraction in (0, 1), e.g. 0.95")
    if any(b < 2 or b > 8 for b in cfg.measure_bits) or not cfg.measure_bits:
        raise UsageError("--bits: give weight bit widths between 2 and 8, e.g. --bits 4,8")
    if cfg.measure_samples < 1 or cfg.measure_timesteps < 1 or cfg.top < 1:
        raise UsageError("--measure-samples, --measure-timesteps and --top must be at least 1")


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def k_for_variance(eigvals: torch.Tensor, fraction: float = 0.95) -> int:
    """Smallest k whose top-k eigenvalues explain `fraction` of the total (0 for a zero spectrum)."""
    lam = eigvals.double().clamp_min(0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0:
        return 0
    cum = lam.cumsum(0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1


def pca_sensitivity(eigvals: torch.Tensor, metric: str = "erank") -> float:
    """A scalar in [0, 1) from the spectrum: 0 = isotropic, → 1 = concentrated on one direction."""
    lam = eigvals.double().clamp_min(0)
    d = lam.numel()
    total = float(lam.sum())
    if total <= 0 or d == 0:
        return 0.0
    p = lam / total
    if metric == "top1":
        return float(p.max())
    if metric == "participation":
        return 1.0 - float(1.0 / p.square().sum()) / d
    nz = p[p > 0]
    erank = math.exp(float(-(nz * nz.log()).sum()))
    return 1.0 - erank / d


def explained_variance(eigvals: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio (for the figures)."""
    lam = eigvals.double().clamp_min(0)
    total = float(lam.sum())
    return lam.cumsum(0) / total if total > 0 else torch.zeros_like(lam)


def range_variability(ts_absmax: torch.Tensor, ts_rows: torch.Tensor) -> float:
    """Coefficient of variation of the per-timestep |x|max over the timesteps the layer ran at."""
    a = ts_absmax[ts_rows > 0].double()
    if a.numel() < 2 or float(a.mean()) <= 0:
        return 0.0
    return float(a.std(unbiased=False) / a.mean())


def layer_components(tensors: dict, name: str, cfg: ScoreConfig, wq_bits: list[int]) -> dict:
    lam = tensors[f"{name}/pca_eigvals"]
    rows = tensors[f"{name}/ts_rows"]
    k95 = k_for_variance(lam, cfg.variance)
    energy = float((tensors[f"{name}/ts_energy"] * rows).sum() / rows.sum().clamp_min(1))
    out_energy = float((tensors[f"{name}/ts_out_energy"] * rows).sum() / rows.sum().clamp_min(1))
    werr = float(tensors[f"{name}/wq_err"][wq_bits.index(cfg.proxy_bits)])
    return {
        "k95": k95,
        "k95_over_d": k95 / max(lam.numel(), 1),
        "pca_sensitivity": pca_sensitivity(lam, cfg.pca_metric),
        "log10_energy": math.log10(max(energy, 1e-30)),
        "range_variability": range_variability(tensors[f"{name}/ts_absmax"], rows),
        "output_error_proxy": math.log10(max(werr, 1e-30) / max(out_energy, 1e-30)),
    }


def zscores(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    if sd <= 0 or not math.isfinite(sd):
        return [0.0] * len(values)
    return ((t - t.mean()) / sd).tolist()


def combined_scores(comps: dict[str, dict], cfg: ScoreConfig) -> dict[str, float]:
    names = list(comps)
    if cfg.formula == "output-error":
        return {n: comps[n]["output_error_proxy"] for n in names}
    total = [0.0] * len(names)
    for c in COMPONENTS:
        w = cfg.weights.get(c, 0.0)
        if w:
            z = zscores([comps[n][c] for n in names])
            total = [a + w * b for a, b in zip(total, z)]
    return dict(zip(names, total))


def cdf_and_rank(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """Empirical CDF (fraction of layers with score ≤ s) and rank (1 = highest score; ties by name order)."""
    values = sorted(scores.values())
    n = len(values)
    import bisect

    cdf = {k: bisect.bisect_right(values, v) / n for k, v in scores.items()}
    order = sorted(scores, key=lambda k: -scores[k])
    return cdf, {k: i + 1 for i, k in enumerate(order)}


# ---------------------------------------------------------------------------------------------
# Measurement: one layer at a time
# ---------------------------------------------------------------------------------------------


def pick_timesteps(timesteps: list[int], k: int) -> list[int]:
    """k of the timesteps, evenly spread (all of them when k ≥ len)."""
    if k >= len(timesteps):
        return list(timesteps)
    idx = torch.linspace(0, len(timesteps) - 1, k).round().long().tolist()
    return [timesteps[i] for i in sorted(set(idx))]


@torch.no_grad()
def calibration_set(model, profile_doc: dict, n_samples: int, n_timesteps: int):
    """Regenerate (x_t, t, y) of the profile's first samples at evenly spread profile timesteps.

    Sample i depends only on (seed, i, label, timesteps), so these are exactly the profile's inputs.
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
    calls = {"i": 0}

    def on_step(t, x, eps):
        b = calls["i"] // len(ts)
        calls["i"] += 1
        if t in keep:
            xs.append(x.clone())
            tt.append(torch.full((x.shape[0],), int(t), dtype=torch.long))
            if labels is not None:
                ys.append(labels[b * batch: b * batch + x.shape[0]])

    sampler = SamplerConfig(method=cal["sampler"]["method"], cfg_scale=cal["sampler"]["cfg_scale"])
    sample(model, n, ts, sampler, labels=labels, seed=int(cal["seed"]), batch_size=batch, on_step=on_step, decode=False)
    x = torch.cat(xs)
    t = torch.cat(tt)
    y = torch.cat(ys) if labels is not None else None
    return x, t, y, sorted(keep), n


@torch.no_grad()
def _eps_all(model, x, t, y, batch: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], batch):
        outs.append(model.eps(x[s:s + batch], t[s:s + batch], y[s:s + batch] if y is not None else None))
    return torch.cat(outs)


@torch.no_grad()
def measure_layer_errors(model, names: list[str], x, t, y, bits: list[int], group_size: int | None = None,
                         batch: int = 64, advance=lambda n=1: None) -> dict[str, dict[str, float]]:
    """Relative MSE of eps when ONE layer's weights are fake-quantised, for each layer and bit width."""
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
            g = group_size if group_size and original[0].numel() % group_size == 0 else None
            mod.weight.data.copy_(fake_quant_weight(original, b, g))
            try:
                out = _eps_all(model, x, t, y, batch)
            finally:
                mod.weight.data.copy_(original)
            per_bits[str(b)] = float((out - ref).double().square().sum()) / denom
            advance(1)
        result[name] = per_bits
    return result


def spearman(a: list[float], b: list[float]) -> dict:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return {"rho": None, "p": None}
    res = spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else round(rho, 4), "p": None if math.isnan(p) else float(f"{p:.3g}")}


def validation_report(layers: dict[str, dict], bits: list[int]) -> dict:
    """Spearman ρ between each signal and the measured error, per bit width."""
    names = list(layers)
    signals = ("combined_score",) + COMPONENTS + ("output_error_proxy",)
    out = {}
    for b in bits:
        measured = [layers[n]["measured_error"][str(b)] for n in names]
        out[str(b)] = {s: spearman([layers[n][s] for n in names], measured) for s in signals}
    return out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def compute_scores(profile_doc: dict, tensors: dict, cfg: ScoreConfig) -> dict[str, dict]:
    """The per-layer entries of scores.json (without measured errors)."""
    wq_bits = [int(b) for b in profile_doc.get("wq_bits", [])]
    if cfg.proxy_bits not in wq_bits:
        raise UsageError(f"--proxy-bits {cfg.proxy_bits}: the profile has weight-error estimates for {wq_bits} only")
    rows = {r["name"]: r for r in profile_doc["layers"]}
    missing = [n for n in rows if f"{n}/pca_eigvals" not in tensors]
    if missing:
        raise InputError(f"profile stats lack layer {missing[0]}; re-run `diffpro profile --force`")
    comps = {n: layer_components(tensors, n, cfg, wq_bits) for n in rows}
    combined = combined_scores(comps, cfg)
    cdf, rank = cdf_and_rank(combined)
    layers = {}
    for n, r in rows.items():
        layers[n] = {
            "role": r["role"], "kind": r["kind"], "in_features": r["in_features"], "out_features": r["out_features"],
            "params": r["params"], "macs": r["macs"], "pca_width": r["pca_width"], "pca_method": r["pca_method"],
            **{k: _round(v) for k, v in comps[n].items()},
            "combined_score": _round(combined[n]), "cdf": _round(cdf[n]), "rank": rank[n],
        }
    return layers


def _round(v):
    return float(f"{v:.6g}") if isinstance(v, float) else v


def write_scores(profile_path: Path, cfg: ScoreConfig, workdir: Path, model=None, ui=None) -> Path:
    """Compute scores.json (and figures) in workdir from the profile at profile_path."""
    from diffpro_cli.artifacts import atomic_write_json, sha256_file
    from diffpro_cli.console import QUIET_UI
    from diffpro_cli.stages.profile import load_profile

    ui = ui or QUIET_UI
    doc, tensors, json_path = load_profile(profile_path)
    layers = compute_scores(doc, tensors, cfg)
    result = {
        "schema": SCHEMA,
        "model": {"spec": doc["model"]["spec"], "sha256": doc["model"].get("sha256"),
                  "random_weights": doc["model"].get("random_weights", False), "untrained": doc["model"].get("untrained", False)},
        "profile": str(json_path),
        "profile_sha256": sha256_file(json_path),
        "formula": cfg.formula,
        "config": cfg.as_dict(),
        "layers": layers,
    }
    if cfg.measure:
        result["validation"] = run_measurement(model, doc, layers, cfg, ui)
    out = Path(workdir) / "scores.json"
    if cfg.figures:
        from diffpro_cli.stages.score_figures import write_score_figures

        result["figures"] = [str(p) for p in write_score_figures(doc, tensors, result, Path(workdir) / "figures", cfg)]
    atomic_write_json(out, result)
    return out


def run_measurement(model, doc: dict, layers: dict, cfg: ScoreConfig, ui) -> dict:
    x, t, y, ts, n = calibration_set(model, doc, cfg.measure_samples, cfg.measure_timesteps)
    names = list(layers)
    with ui.progress("measuring", total=len(names) * len(cfg.measure_bits)) as advance:
        errors = measure_layer_errors(model, names, x, t, y, cfg.measure_bits, cfg.group_size,
                                      batch=max(int(doc["calibration"]["batch"]), 16), advance=advance)
    for name in names:
        layers[name]["measured_error"] = {b: _round(v) for b, v in errors[name].items()}
    return {
        "metric": "relative MSE of the noise prediction, one layer's weights fake-quantised (symmetric, per output channel"
                  + (f", groups of {cfg.group_size}" if cfg.group_size else "") + ")",
        "samples": n, "timesteps": ts, "inputs": int(x.shape[0]), "bits": cfg.measure_bits,
        "spearman": validation_report(layers, cfg.measure_bits),
    }


def run_score(profile_path: str | Path, cfg: ScoreConfig, workdir: str | Path, *, model_spec: str | None = None,
              trust_code: bool = False, weights: str | Path | None = None, force: bool = False, ui=None):
    """The `score` stage through the resumable skeleton; returns (StageOutcome, scores.json path)."""
    from diffpro_cli.artifacts import input_record, read_json
    from diffpro_cli.commands.common import model_input_record
    from diffpro_cli.console import QUIET_UI
    from diffpro_cli.stages.common import run_stage
    from diffpro_cli.stages.profile import SCHEMA as PROFILE_SCHEMA, resolve_profile_path

    ui = ui or QUIET_UI
    validate_config(cfg)
    json_path = resolve_profile_path(profile_path)
    doc = read_json(json_path, PROFILE_SCHEMA)
    inputs = {"profile": input_record(json_path)}
    model = None
    if cfg.measure:
        model = load_measure_model(doc, model_spec, trust_code, weights)
        inputs["model"] = model_input_record(model)
    workdir = Path(workdir)
    out = workdir / "scores.json"
    outputs = {"scores": out}
    if cfg.figures:
        from diffpro_cli.stages.score_figures import figure_paths

        outputs.update(figure_paths(workdir / "figures", cfg))
    outcome = run_stage(workdir, "score", inputs, cfg.as_dict(), outputs,
                        lambda: write_scores(json_path, cfg, workdir, model, ui), force=force, ui=ui)
    return outcome, out


def load_measure_model(doc: dict, model_spec: str | None, trust_code: bool, weights):
    """The model to measure: --model or the profiled one; refuses a model other than the profiled one."""
    from diffpro_cli.models import load_model

    profiled = doc["model"]
    spec = model_spec or profiled["spec"]
    model = load_model(spec, trust_code=trust_code, weights=weights, seed=int(doc["calibration"]["seed"]))
    if profiled.get("sha256") and model.sha256 and model.sha256 != profiled["sha256"]:
        raise InputError(f"{spec}: weights differ from the profiled model ({profiled['spec']}); re-run `diffpro profile` on it or pass --model {profiled['spec']}")
    if bool(profiled.get("untrained")) != bool(model.untrained):
        raise InputError(f"{spec}: the profile was taken {'before' if profiled.get('untrained') else 'after'} its weights were trained; re-run `diffpro profile --force`")
    return model
