"""The quantize stage: validate a plan against the model, calibrate static ranges if asked, write the
integer checkpoint (checkpoint.py) through the resumable stage skeleton."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from os.path import relpath as _relpath
from pathlib import Path

import torch
from torch import nn

from diffpro_cli.artifacts import input_record, read_json, sha256_json
from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.devices import net_device
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel
from diffpro_cli.planning.options import FLOAT_ACT_ROLES
from diffpro_cli.quant.formats import STORAGE_BITS
from diffpro_cli.quant.kernels import ACT_MODES

PLAN_SCHEMA = "diffpro.plan/1"
TIMESTEPS_SCHEMA = "diffpro.timesteps/1"


@dataclass
class QuantizeConfig:
    bits: int | None = None            # uniform weight bits when there is no plan
    act_bits: int | None = None        # --bits only (None: 8); a plan sets each layer's own
    act_mode: str | None = None        # None: the plan's modes, "dynamic" with --bits; given with a plan, it must match it
    group_size: int | None = None      # --bits only
    calib_samples: int = 4             # static mode: samples whose trajectories calibrate the ranges
    calib_steps: int = 50              # static mode without a timesteps file: uniform steps calibrated
    rounding: str = "nearest"          # "nearest" or "gptq" (output-aware rounding of Linear weights)
    seed: int = 0
    float_act: list[str] = field(default_factory=lambda: list(FLOAT_ACT_ROLES))   # uniform baselines only
    pair_bound: str = "auto"           # 8-bit weights (nearest or GPTQ) bounded for AVX2 (layers.bound_pairs):
                                       # "auto" where this CPU lacks VNNI, "on", "off"

PAIR_BOUND_SETTINGS = ("auto", "on", "off")


def check_pair_bound(setting: str) -> None:
    """One usage line for a pair-bound setting that is not auto/on/off (quantize's and score's option)."""
    if setting not in PAIR_BOUND_SETTINGS:
        raise UsageError(f"--pair-bound {setting}: use one of {', '.join(PAIR_BOUND_SETTINGS)}")


def wants_pair_bound(setting: str, device: str = "cpu") -> bool:
    """Whether quantize bounds 8-bit weight pairs (docs/quantization.md, "Saturation"): on a CPU without
    VNNI it lets the integer kernels take 8-bit activations instead of 7-bit ones (+2.0 dB PSNR on the
    built-in DiT's W8A8, AVX2 paths); with VNNI, or for a run on a GPU (whose int8 GEMMs accumulate in
    int32), it would only cost accuracy (-0.3 dB), so "auto" is off there."""
    from diffpro_cli.quant.kernels import cpu_has_vnni

    check_pair_bound(setting)
    return setting == "on" or (setting == "auto" and not str(device).startswith("cuda") and not cpu_has_vnni())


def _model_id(model: DiffusionModel) -> set:
    from diffpro_cli.artifacts import model_input_record

    return {model.sha256, model_input_record(model)["sha256"]} - {None}


def check_same_model(what: str, recorded: dict | None, model: DiffusionModel) -> None:
    """Refuse an artifact made for another model (by sha256, or by spec when no hash was recorded)."""
    if not recorded:
        return
    if not isinstance(recorded, dict):   # a hand-edited file: its .get() was an AttributeError traceback
        raise InputError(f"{what}: its 'model' record is not a JSON object ({type(recorded).__name__}); re-run the stage that wrote it")
    sha, spec = recorded.get("sha256"), recorded.get("spec")
    if sha is not None and _model_id(model) and sha not in _model_id(model):
        raise InputError(f"{what} was made for another model ({spec}, sha256 {str(sha)[:12]}…), not {model.spec}; re-run it for this model")
    if sha is None and spec is not None and spec != model.spec:
        raise InputError(f"{what} was made for {spec}, not {model.spec}; re-run it for this model")


EXAMPLE_ENTRY = '{"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}'


def plan_entry_problem(entry, module: nn.Module) -> str | None:
    """What makes one plan entry unusable on `module`, or None. The one check behind the stage's
    validate_plan (a bad artifact: "re-run allocate") and the API's quantize_ (a bad argument); each
    caller names the layer and words the fix. Float (16-bit) entries and already-quantized layers are
    left as they are, so only their values are checked."""
    if not isinstance(entry, dict):
        return f"the entry {entry!r} is not a dict; use one such as {EXAMPLE_ENTRY}"
    values = {"weight_bits": entry.get("weight_bits", 16), "act_bits": entry.get("act_bits", 8)}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{key} {value!r}: use an integer"
    bits, mode, group = values["weight_bits"], entry.get("act_mode", "dynamic"), entry.get("group_size")
    if bits not in (*STORAGE_BITS, 16):
        return f"weight_bits {bits}: use one of {', '.join(map(str, STORAGE_BITS))}, or 16 for float"
    if values["act_bits"] not in (8, 16):
        return f"act_bits {values['act_bits']}: activations are int8 (8) or float (16); use 8 or 16"
    if not isinstance(mode, str) or mode not in ACT_MODES:
        return f"act_mode {mode!r}: use one of {', '.join(ACT_MODES)}"
    if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
        return f"group_size {group!r}: use an integer, or null (per-channel scales)"
    if bits >= 16 or getattr(module, "is_diffpro_quant", False):
        return None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"is {type(module).__name__}; only nn.Linear and nn.Conv2d layers can be quantized"
    in_flat = module.weight[0].numel()
    if group is not None and (group <= 0 or in_flat % group):
        return f"group_size {group} does not divide its input size {in_flat}; use a divisor of {in_flat} or null (per-channel scales)"
    return None


def validate_plan(plan: dict, model: DiffusionModel, source: str = "plan") -> dict:
    """Every layer named exists and is quantizable, bits and modes are supported; returns plan["layers"].
    A bad value is a bad artifact (exit 3, InputError), not a bad option: the file is what must change."""
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        raise InputError(f"{source}: no 'layers' table; re-run `diffpro allocate`")
    check_same_model(source, plan.get("model"), model)
    if not layers:
        raise InputError(f"{source}: its 'layers' table is empty (nothing to quantize); re-run `diffpro allocate`")
    known = model.quantizable_layers()
    for name, entry in layers.items():
        if name not in known:
            raise InputError(f"{source}: layer {name!r} does not exist in {model.spec}; re-run `diffpro allocate` for this model")
        problem = plan_entry_problem(entry, known[name][0])
        if problem is not None:
            raise InputError(f"{source}: layer {name}: {problem} (re-run `diffpro allocate`)")
    return layers


def check_plan_options(plan: dict, cfg: QuantizeConfig, source: str = "plan") -> None:
    """A plan fixes every layer's activation bits, mode and group size (allocate priced them): --act-bits and
    --group-size are for --bits only, and --act-mode is accepted with a plan only where it matches the
    plan's integer layers (a config that restates "dynamic" stays valid); otherwise it would be ignored."""
    for flag, value in (("--act-bits", cfg.act_bits), ("--group-size", cfg.group_size)):
        if value is not None:
            raise UsageError(f"{flag} {value}: applies to --bits only; {source} sets it per layer "
                             f"(re-run `diffpro allocate` with {flag} to change it), or leave {flag} out")
    if cfg.act_mode is None:
        return
    modes = sorted({e.get("act_mode", "dynamic") for e in plan["layers"].values()   # "none": weight-only, as act_bits 16
                    if e.get("weight_bits", 16) < 16 and e.get("act_bits", 8) < 16 and e.get("act_mode") != "none"})
    if modes and modes != [cfg.act_mode]:
        raise UsageError(f"--act-mode {cfg.act_mode}: {source} runs its integer layers with {'/'.join(modes)} activations "
                         f"(allocate chose them); re-run `diffpro allocate --act-mode {cfg.act_mode}`, or leave --act-mode out")


def check_uniform_bits(bits: int) -> None:
    """--bits of a uniform baseline: a storage width, or 16 for float."""
    if bits not in (*STORAGE_BITS, 16):
        raise UsageError(f"--bits {bits}: supported weight widths are {', '.join(map(str, STORAGE_BITS))} (16 = float)")


def uniform_plan(model: DiffusionModel, bits: int, act_bits: int = 8, act_mode: str = "dynamic", group_size: int | None = None,
                 float_act: tuple[str, ...] | list[str] = FLOAT_ACT_ROLES) -> dict:
    """Every quantizable layer at `bits` (the uniform baselines). Layers a group size does not divide
    keep per-channel scales; layers of a `float_act` role (default: patch embedding and final layer,
    planning.options.FLOAT_ACT_ROLES) compute on float activations from the same stored weights."""
    check_uniform_bits(bits)
    layers = {}
    for name, (mod, role) in model.quantizable_layers().items():
        in_flat = mod.weight[0].numel()
        g = group_size if group_size and in_flat % group_size == 0 else None
        a = 16 if role in float_act and bits < 16 else act_bits
        layers[name] = {"weight_bits": bits, "act_bits": a, "act_mode": act_mode, "group_size": g}
    return {"schema": PLAN_SCHEMA, "model": {"spec": model.spec, "sha256": model.sha256}, "layers": layers,
            "solver": {"method": "uniform", "status": "n/a"}}


def read_timesteps(path: Path, model: DiffusionModel) -> tuple[dict, list[int]]:
    """A timesteps.json made for `model` (refused if pruned for another) and its validated timesteps."""
    from diffpro_cli.sampling import timesteps_of

    doc = read_json(path, TIMESTEPS_SCHEMA)
    check_same_model(str(path), doc.get("model"), model)
    return doc, timesteps_of(doc, path, model.num_train_timesteps)


def _run_trajectories_with_input_hooks(model: DiffusionModel, names: list[str], record, timesteps: list[int],
                                       n_samples: int, seed: int) -> None:
    """Sample the float model's own DDIM trajectories over `timesteps`, calling
    record(name, input, step_index) before each named layer runs."""
    from diffpro_cli.sampling import SamplerConfig, sample

    index = {t: i for i, t in enumerate(timesteps)}
    current = {"i": 0}
    modules = model.quantizable_layers()

    def hook(name):
        return lambda mod, inputs: record(name, inputs[0].detach(), current["i"])

    handles = [modules[name][0].register_forward_pre_hook(hook(name)) for name in names]
    forward = model.forward_fn

    def tracking(net, x, t, y):
        current["i"] = index.get(int(t.reshape(-1)[0]), current["i"])
        return forward(net, x, t, y)

    model.forward_fn = tracking
    try:
        sample(model, n_samples, timesteps, SamplerConfig(method="ddim"), seed=seed, batch_size=n_samples)
    finally:
        model.forward_fn = forward
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: DiffusionModel, static_names: list[str], hessian_names: list[str], timesteps: list[int],
              n_samples: int = 4, seed: int = 0) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """One pass over the float model's own DDIM trajectories on `timesteps` that records both
    calibrations a plan can need, so static ranges and GPTQ inputs never cost two sampling runs:
    - static_names → (timesteps, max |input| at each timestep);
    - hessian_names (Linear layers) → E[x xᵀ] of the inputs over every token (GPTQ's Hessian, up to a
      factor of 2), [in, in] float64."""
    absmax = {name: torch.zeros(len(timesteps)) for name in static_names}
    sums = dict.fromkeys(hessian_names)
    counts = dict.fromkeys(hessian_names, 0)

    def record(name, x, i):
        if name in absmax:
            absmax[name][i] = max(float(absmax[name][i]), float(x.abs().max()))
        if name in sums:
            flat = x.reshape(-1, x.shape[-1]).double()
            sums[name] = flat.T @ flat if sums[name] is None else sums[name].addmm_(flat.T, flat)
            counts[name] += flat.shape[0]

    names = list(dict.fromkeys([*static_names, *hessian_names]))
    if names:
        _run_trajectories_with_input_hooks(model, names, record, timesteps, n_samples, seed)
    ranges = {name: (list(timesteps), absmax[name]) for name in static_names}
    hessians = {name: (sums[name] / counts[name]).cpu() for name in hessian_names if sums[name] is not None}
    return ranges, hessians


def calibrate_static(model: DiffusionModel, names: list[str], timesteps: list[int], n_samples: int = 4, seed: int = 0) -> dict[str, tuple]:
    """Max |input| of each named layer at each timestep (see `calibrate`). Returns name → (timesteps, absmax)."""
    return calibrate(model, names, [], timesteps, n_samples, seed)[0]


def collect_hessians(model: DiffusionModel, names: list[str], timesteps: list[int], n_samples: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """E[x xᵀ] of each named Linear layer's inputs (see `calibrate`). Returns name → [in, in] float64."""
    return calibrate(model, [], names, timesteps, n_samples, seed)[1]


def apply_plan(model: DiffusionModel, plan: dict, static_ranges: dict | None = None, fuse: bool = True) -> DiffusionModel:
    """Swap the model's layers for quant layers IN PLACE (for in-memory use; the checkpoint path is
    `quantize_to_dir`, which leaves the float model untouched)."""
    swap_planned_layers(model.net, {name: mod for name, (mod, _) in model.quantizable_layers().items()},
                        plan.get("layers", {}), static_ranges, fuse)
    return model


def swap_planned_layers(net: nn.Module, modules: dict[str, nn.Module], entries: dict, static_ranges: dict | None = None,
                        fuse: bool = True, hessians: dict | None = None) -> nn.Module:
    """Replace each of `modules` (name in `net` → its float layer) that `entries` quantizes with its quant
    layer, in place, the kernel packed on that layer's device; then fuse q/k/v inputs and MLP
    activations. apply_plan and the API's quantize_ both swap through here. `hessians`: GPTQ rounding
    for the Linear layers they name."""
    from diffpro_cli.checkpoint import plan_layer, set_submodule
    from diffpro_cli.quant.epilogue import fuse_activations
    from diffpro_cli.quant.groups import fuse_shared_inputs

    for name, mod in modules.items():
        layer = plan_layer(mod, entries.get(name), (static_ranges or {}).get(name), (hessians or {}).get(name))
        if layer is not None and layer is not mod:
            device = mod.weight.device     # the network's device: its kernel is packed there
            set_submodule(net, name, layer.to(device).prepare(device))
    if fuse:
        fuse_shared_inputs(net)
        fuse_activations(net)
    return net


def quantize_to_dir(model: DiffusionModel, plan: dict, out_dir: Path, timesteps: list[int] | None = None,
                    cfg: QuantizeConfig | None = None, provenance: dict | None = None, ui: UI = QUIET_UI) -> dict:
    """Calibrate (static ranges; GPTQ inputs with rounding "gptq") and write the checkpoint; returns diffpro.json's content."""
    from diffpro_cli.checkpoint import save_quantized

    cfg = cfg or QuantizeConfig()
    provenance = {"plan_sha256": sha256_json(plan), **(provenance or {})}   # the plan as given, not as marked below
    plan, ranges, hessians = prepare_plan(model, plan, timesteps, cfg, ui)
    with ui.progress("quantize: rounding layers", total=len(model.quantizable_layers())) as advance:
        return save_quantized(model, plan, out_dir, timesteps, static_ranges=ranges, provenance=provenance, hessians=hessians,
                              cache=plan.get("cache"), advance=advance)


def prepare_plan(model: DiffusionModel, plan: dict, timesteps: list[int] | None, cfg: QuantizeConfig, ui: UI = QUIET_UI,
                 known_hessians: dict | None = None) -> tuple[dict, dict | None, dict | None]:
    """(plan marked for this CPU's pair bound, static ranges, GPTQ Hessians): everything quantize_to_dir
    calibrates before rounding. `known_hessians` (name → Hessian) are reused, not calibrated again."""
    from diffpro_cli.sampling import uniform_timesteps

    if wants_pair_bound(cfg.pair_bound, str(net_device(model.net))):   # every entry asks; layers.bound_pairs applies where it can
        plan = {**plan, "layers": {n: {**e, "pair_bound": True} for n, e in plan["layers"].items()}}
    static = [n for n, e in plan["layers"].items() if e.get("act_mode") == "static" and e.get("act_bits", 8) < 16 and e.get("weight_bits", 16) < 16]
    cal_ts = timesteps or uniform_timesteps(model.num_train_timesteps, cfg.calib_steps)
    linear = []
    if cfg.rounding == "gptq":
        layers = model.quantizable_layers()
        linear = [n for n, e in plan["layers"].items() if e.get("weight_bits", 16) < 16 and isinstance(layers[n][0], nn.Linear)]
    known = known_hessians or {}
    need = [n for n in linear if n not in known]
    ranges, hessians = None, ({n: known[n] for n in linear if n in known} or None)
    if static or need:
        what = [f"{len(static)} static ranges"] * bool(static) + [f"GPTQ inputs of {len(need)} Linear layers"] * bool(need)
        ui.info(f"quantize: calibrating {' and '.join(what)} over {len(cal_ts)} timesteps ({cfg.calib_samples} samples, one pass)")
        ranges, new = calibrate(model, static, need, cal_ts, cfg.calib_samples, cfg.seed)
        hessians = {**(hessians or {}), **new} or None
    return plan, ranges, hessians


def quantize_in_memory(model: DiffusionModel, plan: dict, timesteps: list[int] | None, cfg: QuantizeConfig,
                       known_hessians: dict | None = None, ui: UI = QUIET_UI) -> tuple[DiffusionModel, dict | None]:
    """A copy of `model` quantized as quantize_to_dir would write it (pair bound, calibration, rounding),
    without writing; returns it and the Hessians used (pass them back to reuse them)."""
    import copy

    plan, ranges, hessians = prepare_plan(model, plan, timesteps, cfg, ui, known_hessians)
    q = copy.deepcopy(model)
    swap_planned_layers(q.net, {name: mod for name, (mod, _) in q.quantizable_layers().items()}, plan["layers"], ranges,
                        hessians=hessians)
    return q, hessians


def quantize_uniform_to_dir(model: DiffusionModel, bits: int, out_dir: Path, act_mode: str = "dynamic") -> dict:
    """The uniform W`bits`A8 baseline checkpoint (used by bench)."""
    return quantize_to_dir(model, uniform_plan(model, bits, 8, act_mode), Path(out_dir))


def cache_timesteps(plan: dict, timesteps: list[int] | None, model: DiffusionModel, ui: UI = QUIET_UI) -> list[int] | None:
    """A plan whose cache section runs a schedule fixes the checkpoint's timesteps to the schedule's
    (allocate chose them together); the schedule must fit the model's units."""
    from diffpro_cli.cache import num_cache_units, record_policy

    policy = record_policy(plan.get("cache"))
    if policy is None:
        return timesteps
    if policy.num_units != num_cache_units(model.net):
        raise InputError(f"plan: its cache schedule is for {policy.num_units} units, {model.spec} has "
                         f"{num_cache_units(model.net)}; re-run `diffpro allocate` for this model")
    if timesteps is not None and sorted(timesteps) != policy.timesteps:
        ui.info(f"quantize: the plan's cache schedule runs {len(policy.timesteps)} timesteps; the checkpoint records "
                f"those, not the {len(timesteps)} of the timesteps file")
    return list(policy.timesteps)


def validate_config(cfg: QuantizeConfig) -> None:
    """Every option on its own (one `error:` line each), before anything loads: also what `run` checks
    before its first stage, so a bad [quantize] value cannot fail after profile, score and prune ran."""
    if cfg.bits is not None:
        check_uniform_bits(cfg.bits)
    if cfg.act_mode is not None and cfg.act_mode not in ACT_MODES:
        raise UsageError(f"--act-mode {cfg.act_mode}: use one of {', '.join(ACT_MODES)}")
    if cfg.rounding not in ("nearest", "gptq"):
        raise UsageError(f"--rounding {cfg.rounding}: use nearest or gptq")
    check_pair_bound(cfg.pair_bound)
    if cfg.act_bits is not None and cfg.act_bits not in (8, 16):
        raise UsageError(f"--act-bits {cfg.act_bits}: use 8 (int8 activations) or 16 (weight-only)")
    if cfg.group_size is not None and cfg.group_size <= 0:
        raise UsageError(f"--group-size {cfg.group_size}: must be a positive divisor of the layers' input sizes")
    if cfg.calib_samples < 1:
        raise UsageError(f"--calib-samples {cfg.calib_samples}: must be at least 1")
    if cfg.calib_steps < 1:   # a config key only ([quantize] calib_steps): static calibration without a timesteps file
        raise UsageError(f"calib_steps {cfg.calib_steps}: must be at least 1 (the uniform steps static ranges are calibrated on)")
    from diffpro_cli.models.base import ROLES
    unknown = [r for r in cfg.float_act if r not in ROLES]
    if unknown:
        raise UsageError(f"--float-act {','.join(unknown)}: unknown role; use a comma list of {','.join(ROLES)} or none")


def run_quantize(ctx, cfg: QuantizeConfig, *, plan_path: Path | None = None, timesteps_path: Path | None = None,
                 out_dir: Path | None = None):
    """Everything `diffpro quantize` does; all inputs are validated before anything is written.
    Returns a StageResult (value: the checkpoint's diffpro.json record)."""

    out_dir = Path(out_dir) if out_dir is not None else ctx.workdir / "quantized"
    validate_config(cfg)
    if plan_path is not None and cfg.bits is not None:
        raise UsageError("--plan and --bits both given; use --plan for a mixed-precision plan or --bits for a uniform baseline")
    from diffpro_cli.loading import is_quantized_checkpoint

    if is_quantized_checkpoint(ctx.model_spec):
        raise InputError(f"{ctx.model_spec}: is already a diffpro quantized checkpoint; quantize the float model it was made from")
    model = ctx.model()
    inputs = {"model": ctx.model_record(model)}
    if plan_path is not None:
        plan = read_json(plan_path, PLAN_SCHEMA)
        validate_plan(plan, model, str(plan_path))
        check_plan_options(plan, cfg, str(plan_path))
        inputs["plan"] = input_record(plan_path)
        from diffpro_cli.stages.pair_bound_assumption import pair_bound_note

        note = pair_bound_note(plan, model, cfg.pair_bound)   # priced under another saturation rule
        if note is not None:
            getattr(ctx.ui, note[0])(note[1])
    elif cfg.bits is not None:
        plan = uniform_plan(model, cfg.bits, cfg.act_bits or 8, cfg.act_mode or "dynamic", cfg.group_size, cfg.float_act)
    else:
        raise UsageError("quantize needs --plan PLAN.json (from `diffpro allocate`) or --bits 8|4 for a uniform baseline")
    timesteps = None
    if timesteps_path is not None:
        timesteps = read_timesteps(timesteps_path, model)[1]
        inputs["timesteps"] = input_record(timesteps_path)
    if plan.get("joint") and plan.get("timesteps") and [int(t) for t in plan["timesteps"]] != timesteps:
        # a joint plan chose its step count with its bits: prune's subset (run and a plain --timesteps pass
        # WORKDIR/timesteps.json) would silently undo that choice
        if timesteps is not None:
            ctx.ui.warn(f"quantize: the plan chose {len(plan['timesteps'])} steps jointly with its bits (allocate "
                        f"--budget latency=...); {timesteps_path}'s {len(timesteps)} are not used")
        timesteps = [int(t) for t in plan["timesteps"]]
    elif timesteps is None and plan.get("timesteps"):
        timesteps = [int(t) for t in plan["timesteps"]]
    timesteps = cache_timesteps(plan, timesteps, model, ctx.ui)
    config = asdict(cfg) | {"out": _relpath(out_dir.resolve(), ctx.workdir.resolve())}   # one spelling of one place
    provenance = {"plan_sha256": sha256_json(plan), "timesteps_sha256": None if timesteps is None else sha256_json(timesteps),
                  "inputs": {k: v["sha256"] for k, v in inputs.items()}}
    if (plan.get("step_cut_check") or {}).get("verdict"):   # bench shows it beside what it measures
        provenance["plan_check"] = plan["step_cut_check"]["verdict"]
    return ctx.run_stage("quantize", inputs, config,
                         {"weights": out_dir / "model.safetensors", "meta": out_dir / "diffpro.json"},
                         lambda: quantize_to_dir(model, plan, out_dir, timesteps, cfg, provenance, ctx.ui), seed=cfg.seed,
                         reread=lambda: read_json(out_dir / "diffpro.json"))
