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

The components live in score_components.py, the calibration inputs and single-layer errors in
score_errors.py; this module holds the config, the scores.json document, its figures and the stage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from diffpro_cli.devices import net_device
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.stages.pair_bound_assumption import measure_pair_bounded_errors, pair_bound_record
from diffpro_cli.stages.score_components import (
    COMPONENTS,
    cdf_and_rank,
    combined_scores,
    explained_variance,
    layer_components,
)
from diffpro_cli.stages.score_errors import (
    calibration_set,
    measure_act_errors,
    measure_layer_errors,
    reference_eps,
    taylor_layer_errors,
)

SCHEMA = "diffpro.scores/1"
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
    pair_bound: str = "auto"      # the quantize --pair-bound the measurements assume (stages/pair_bound_assumption.py)
    figures: bool = True
    figure_layer: str | None = None
    top: int = 8

    @property
    def needs_model(self) -> bool:
        return self.measure or self.taylor or self.formula == "taylor"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["pair_bound"] == "auto":   # the default: configs (and their stage hashes) stay as before it existed
            del d["pair_bound"]
        return d


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
    # nan / inf made every combined score NaN or ±inf (--component-weights, a config's or the API's weights)
    if any(not isinstance(w, (int, float)) or not math.isfinite(w) for w in cfg.weights.values()):
        raise UsageError(f"component weights {cfg.weights}: each must be a finite number, e.g. pca=1,energy=1,k95=-1,range=1")
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
    from diffpro_cli.stages.quantize import check_pair_bound

    check_pair_bound(cfg.pair_bound)


def spearman(a: list[float], b: list[float]) -> dict:
    """Spearman ρ and its two-sided p-value (None when undefined)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return {"rho": None, "p": None}
    if len(set(a)) < 2 or len(set(b)) < 2:   # undefined (a constant signal, e.g. range over one timestep);
        return {"rho": None, "p": None}      # scipy would say so on stderr, through --quiet
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
    bound = pair_bound_record(cfg.pair_bound, str(net_device(model.net)) if model is not None else "cpu")
    result = {
        "schema": SCHEMA,
        "model": {"spec": doc["model"]["spec"], "sha256": doc["model"].get("sha256"),
                  "random_weights": doc["model"].get("random_weights", False), "untrained": doc["model"].get("untrained", False),
                  "checkpoint_other_bytes": doc.get("checkpoint_other_bytes")},
        "profile": str(json_path),
        "profile_sha256": sha256_file(json_path),
        "formula": cfg.formula,
        "score_definition": score_definition(cfg),
        "config": cfg.as_dict() | ({"proxy_bits": min(cfg.bits)} if taylor is not None else {}),
        "layers": layers,
    }
    if bound is not None:
        result["pair_bound"] = bound
    if calib is not None:
        x, t, y, ts, n = calib
        result["calibration"] = {"samples": n, "timesteps": ts, "inputs": int(x.shape[0]), "bits": cfg.bits,
                                 "weights": "symmetric per output channel" + (f", groups of {cfg.group_size}" if cfg.group_size else "")}
    if cfg.measure:
        x, t, y, ts, n = calib
        batch = int(doc["calibration"]["batch"])
        assumed = bool(bound and bound["assumed"])
        reference = reference_eps(model, x, t, y, batch)   # one unquantised pass serves every measurement
        with ui.progress("measuring", total=len(names) * (len(cfg.bits) + 1 + assumed)) as advance:
            errors = measure_layer_errors(model, names, x, t, y, cfg.bits, cfg.group_size, batch=batch, advance=advance,
                                          reference=reference)
            act_errors = measure_act_errors(model, names, x, t, y, cfg.act_mode, batch=batch, advance=advance,
                                            reference=reference)
            bounded = measure_pair_bounded_errors(model, names, x, t, y, act_errors, cfg.act_mode, batch=batch,
                                                  advance=advance, reference=reference) if assumed else {}
        for name in names:
            layers[name]["measured_error"] = {b: _round(v) for b, v in errors[name].items()}
            if name in bounded:   # the 8-bit error of the weights quantize's pair bound will store
                layers[name]["measured_error_pair_bounded"] = {"8": _round(bounded[name])}
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
    from diffpro_cli.stages.profile_stats import hist_magnitude_edges, magnitude_hist

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
    recorded = doc.get("inputs_sha256")   # the model with its conditioning (profiles before it was recorded: not checked)
    if recorded and recorded != ctx.model_record(model)["sha256"]:
        raise InputError(f"{ctx.model_spec}: was profiled with other conditioning than this run's (--conditioning / "
                         f"--prompts); pass the ones the profile used, or re-run `diffpro profile` with these")
    return model


def run_score(ctx, cfg: ScoreConfig, *, profile_path: str | Path | None = None):
    """The `score` stage through the resumable skeleton; returns a StageResult (value: the scores.json path).

    The context's model spec may be empty (`diffpro score` without --model): the profiled model's spec is
    used then, loaded with the context's trust flag and weights."""
    from diffpro_cli.artifacts import input_record, read_json
    from diffpro_cli.stages.profile import SCHEMA as PROFILE_SCHEMA, check_profile_doc, resolve_profile_path

    ui = ctx.ui
    validate_config(cfg)
    json_path = resolve_profile_path(profile_path if profile_path is not None else ctx.workdir / "profile")
    doc = read_json(json_path, PROFILE_SCHEMA)
    check_profile_doc(doc, json_path)
    names = [r["name"] for r in doc["layers"]]
    if cfg.figure_layer is not None and cfg.figure_layer not in names:
        raise UsageError(f"--layer {cfg.figure_layer}: not a profiled layer; see the names in {json_path}")
    stats_path = json_path.parent / doc.get("stats_file", "stats.safetensors")
    if not stats_path.is_file():
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
    config = cfg.as_dict()
    bound = pair_bound_record(cfg.pair_bound, ctx.device)
    if bound is not None:   # scores made under another saturation rule are not up to date (a VNNI CPU's stay so)
        config["pair_bound_record"] = bound
    result = ctx.run_stage("score", inputs, config, outputs, lambda: write_scores(json_path, cfg, workdir, model, ui),
                           seed=int(doc["calibration"]["seed"]))
    result.value = out
    return result
