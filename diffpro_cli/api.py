"""The Python face of diffpro: the same stage functions the CLI wraps, returning the records the
artifacts hold. `import diffpro` re-exports everything here (docs/api.md).

    import diffpro
    plan = diffpro.allocate("builtin:dit-mnist", workdir="work", budget="avg-bits=4.4")
    model = diffpro.load("work/quantized")           # a quantized checkpoint, or any model spec
    eps = model.net(x, timestep=t, class_labels=y).sample   # the original forward signature

Each stage function takes the model spec (or an already loaded `DiffusionModel`), the work directory
and the stage's options as keyword arguments (the fields of its config dataclass, e.g.
`ProfileConfig`), goes through the same lock as the CLI (skipped when up to date), and returns the
artifact's JSON record. `device="cuda"` runs the stage on a GPU, as the CLI's `--device` does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from torch import nn

from diffpro_cli.diffusers_quantizer import register_diffusers_quantizer
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.lora import COMPILED_MARK, load_lora, unload_lora
from diffpro_cli.models.base import DiffusionModel

__all__ = ["DiffusionModel", "allocate", "bench", "compile", "install_timestep_hook", "load", "load_lora", "profile", "prune", "quantize",
           "quantize_", "register_diffusers_quantizer", "score", "set_compute_dtype", "unload_lora"]


def _context(model: str | DiffusionModel, workdir: str | Path, trust_code: bool, weights, seed: int, force: bool, quiet: bool,
             conditioning=None, prompts=None, negative_prompt: str = "", device: str | None = None):
    """The stage context of one API call. `device`: where the stage computes ("cpu", "cuda", "cuda:N");
    default the CPU, or, for an already loaded model, where its network lives (which `device` moves it to)."""
    from diffpro_cli.console import UI
    from diffpro_cli.devices import net_device, place
    from diffpro_cli.stages.context import StageContext

    spec = model.spec if isinstance(model, DiffusionModel) else str(model)
    _check_seed(seed)
    if not isinstance(workdir, (str, os.PathLike)):
        raise UsageError(f"workdir {workdir!r}: pass a directory path (str or pathlib.Path)")
    if device is None:
        device = str(net_device(model.net)) if isinstance(model, DiffusionModel) else "cpu"
    ctx = StageContext.create(spec, workdir, trust_code=trust_code, weights=weights, seed=seed,
                              ui=UI(quiet=quiet), force=force, conditioning=conditioning,
                              prompts=prompts, negative_prompt=negative_prompt, device=device)
    if isinstance(model, DiffusionModel):
        ctx.use_model(place(model, ctx.device))
    return ctx


def _loaded(model, function: str) -> DiffusionModel:
    """`model` if it is a loaded DiffusionModel; else one UsageError naming the fix (not an AttributeError later)."""
    if not isinstance(model, DiffusionModel):
        raise UsageError(f"diffpro.{function}: expected a DiffusionModel, got {type(model).__name__}; "
                         f"load it first: model = diffpro.load(spec)")
    return model


def _module(model, function: str) -> nn.Module:
    """The network of a DiffusionModel, or an nn.Module as it is; else one UsageError."""
    net = model.net if isinstance(model, DiffusionModel) else model
    if not isinstance(net, nn.Module):
        raise UsageError(f"diffpro.{function}: expected a DiffusionModel or an nn.Module, got {type(model).__name__}")
    return net


def _path_arg(name: str, value) -> Path | None:
    """A path keyword (str or os.PathLike) as a Path; the stages below take Path objects."""
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{name}={value!r}: pass a path (str or pathlib.Path)")
    return Path(value)


def _check_seed(seed) -> None:
    from diffpro_cli.stages.context import check_seed

    check_seed(seed, "seed")


def _config(cls, options: dict, **defaults):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(sorted(names))}")
    from diffpro_cli.stages.run import type_fits

    hints = typing.get_type_hints(cls)
    options = dict(options)
    for name, value in options.items():   # a wrong type fails here, not as a TypeError deep in the stage
        if isinstance(value, os.PathLike) and type_fits("", hints[name]):   # a path option (cost_table=Path(...)) as str
            options[name] = value = os.fspath(value)
        if not type_fits(value, hints[name]):
            expected = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name])
            raise UsageError(f"option {name}={value!r}: expected {expected} ({cls.__name__})")
    return cls(**{**{k: v for k, v in defaults.items() if k in names}, **options})


def load(spec: str | Path, *, device: str = "cpu", dtype=None, trust_code: bool = False, weights: str | Path | None = None,
         seed: int = 0, cache: bool = True, keep_integers: bool = False) -> DiffusionModel:
    """A model spec or a diffpro quantized checkpoint as a `DiffusionModel`. Its `.net` keeps the original
    forward signature (a diffusers transformer is called as `net(hidden_states, timestep=..., ...)`);
    static-activation layers learn the current timestep from a forward pre-hook, no context needed.
    A checkpoint whose plan reuses computation across steps runs its cache schedule on every call
    (keyed by the timestep; `model.net._diffpro_cache` counts what ran); `cache=False` computes all.
    A CPU load releases each layer's stored integers once its kernel has packed them (half the memory);
    `keep_integers=True` keeps them, for `state_dict()`, `copy.deepcopy` with repacking, moving the model
    to another device, or re-saving. Ignored for float specs."""
    from diffpro_cli.loading import load_model

    _check_seed(seed)
    # a quantized checkpoint keeps its stored integers when it goes to a GPU: its layers pack them there
    if not isinstance(keep_integers, bool):
        raise UsageError(f"diffpro.load: keep_integers={keep_integers!r}: pass True or False")
    model = load_model(str(spec), trust_code=trust_code, weights=weights, seed=seed, device=device, keep_integers=keep_integers)
    if dtype is not None:
        set_compute_dtype(model, dtype)
    install_timestep_hook(model.net)
    if cache:
        from diffpro_cli.cache import install_cache, model_cache_record, record_policy

        policy = record_policy(model_cache_record(model))
        if policy is not None:
            install_cache(model, policy)
    return model


def compile(model: DiffusionModel, *, device: str | None = None, in_place: bool = False) -> DiffusionModel:  # noqa: A001 - torch.compile's name
    """The model torch.compile'd for where it runs, as `bench --compile` does: on the CPU its integer layers
    on oneDNN's compiled int8 path (inductor with freezing), on a GPU its CUDA kernels traced into the
    graph. A model running a cache schedule (a checkpoint loaded with one) gets each block compiled on
    its own, the skip decisions staying Python, and is returned as it is; otherwise a new
    `DiffusionModel` whose `eps` calls the compiled network (`.net` is the same module: its state_dict and
    checkpoint are unchanged). `in_place=True`: `.net` itself runs compiled at every call (as
    nn.Module.compile does), for a diffusers pipeline holding it; the model is returned as it is.
    Call it under `torch.no_grad()`; the first call per input shape compiles.
    Where compile is unavailable: one notice line and the model as it was."""
    import torch

    from diffpro_cli.cache import unit_modules
    from diffpro_cli.devices import net_device
    from diffpro_cli.quant import compiled_cuda

    _loaded(model, "compile")
    if device is not None:   # the spelling only: where the model is, is the model's business
        try:
            device = str(torch.device(device))
        except (RuntimeError, TypeError):
            raise UsageError(f"diffpro.compile: device {device!r}: use cpu, cuda or cuda:N") from None
        if torch.device(device).type not in ("cpu", "cuda"):
            raise UsageError(f"diffpro.compile: device {device!r}: diffpro runs on cpu or cuda")
    else:
        device = str(net_device(model.net))
    if "_diffpro_cache" in vars(model.net):   # install_cache: the runner's wrappers stay Python
        if compiled_cuda.compile_regions_on([m for unit in unit_modules(model.net) for m in unit], device):
            model.net.__dict__[COMPILED_MARK] = True   # lora.py refuses adapter changes the graph would ignore
        return model
    if in_place:
        if compiled_cuda.compile_in_place_on(model.net, device):
            model.net.__dict__[COMPILED_MARK] = True
        return model
    out = compiled_cuda.compile_model_on(model, device)
    if out is not model:
        model.net.__dict__[COMPILED_MARK] = True
    return out


def set_compute_dtype(model: DiffusionModel, dtype) -> DiffusionModel:
    """Run the model's float math in `dtype` (torch.bfloat16 / torch.float16, or their names; float32 undoes
    it): see `DiffusionModel.set_compute_dtype`. Quantized checkpoints planned for bf16 load with it set."""
    return _loaded(model, "set_compute_dtype").set_compute_dtype(dtype)


# The timestep contexts the hooks below entered, innermost last: per thread (a ContextVar), so that
# threads calling one network at once each leave their own (a shared list made them exit each other's).
_HOOK_CONTEXTS: contextvars.ContextVar = contextvars.ContextVar("diffpro_timestep_hook_contexts", default=())


def install_timestep_hook(net: nn.Module) -> nn.Module:
    """A forward pre-hook that hands the call's timestep (keyword `timestep`, else the second positional
    argument) to the static-activation layers for the duration of the call, and runs the call under
    autocast in the model's compute dtype where one is set (`set_compute_dtype`; a checkpoint planned for
    bf16), so a pipeline calling the network computes as diffpro's sampler does; idempotent."""
    _module(net, "install_timestep_hook")
    if getattr(net, "_diffpro_timestep_hook", False):
        return net
    # ahead of a flow network's own hook (models/base.py), which turns diffpro's integer index into σ·N:
    # static scales are keyed by the index
    net.register_forward_pre_hook(_enter_timestep_hook, with_kwargs=True, prepend=True)
    net.register_forward_hook(_exit_timestep_hook, with_kwargs=True, always_call=True)
    net._diffpro_timestep_hook = True
    return net


# module-level (not closures) so that a network carrying them pickles: torch.save(model.net)
def _enter_timestep_hook(module, args, kwargs):
    import contextlib

    import torch

    from diffpro_cli.devices import net_device
    from diffpro_cli.models.base import COMPUTE_DTYPE_ATTR, index_of_timestep
    from diffpro_cli.quant.layers import timestep_context

    cm = contextlib.ExitStack()
    cm.enter_context(timestep_context(index_of_timestep(module, kwargs.get("timestep", args[1] if len(args) > 1 else None))))
    dtype = module.__dict__.get(COMPUTE_DTYPE_ATTR)
    in_dtype = None
    if dtype is not None:   # bf16/fp16 float math for any caller, not only DiffusionModel.raw (which nests it)
        try:
            cm.enter_context(torch.autocast(net_device(module).type, dtype=dtype))
        except BaseException:
            cm.close()
            raise
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        in_dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else None
    _HOOK_CONTEXTS.set((*_HOOK_CONTEXTS.get(), (module, cm, in_dtype)))


def _exit_timestep_hook(module, args, kwargs, output):
    """Leaves the context this module's pre-hook entered; nothing when that hook never ran (an earlier
    pre-hook raised), so a failed inner network cannot pop the context of the call around it."""
    stack = _HOOK_CONTEXTS.get()
    if not stack or stack[-1][0] is not module:
        return None
    _HOOK_CONTEXTS.set(stack[:-1])
    _, cm, in_dtype = stack[-1]
    cm.__exit__(None, None, None)
    # under autocast the prediction comes out bf16: a pipeline would keep its latents in bf16 from there on
    # (FluxPipeline's VAE then failed: "Input type (BFloat16) and bias type (float)"); give it the input's dtype
    return None if in_dtype is None else _cast_floats(output, in_dtype)


def _cast_floats(output, dtype):
    """`output` (a tensor, a tuple, or a diffusers output: a dict-like dataclass) with its floating tensors in `dtype`."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(_cast_floats(o, dtype) for o in output)
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):   # diffusers' BaseOutput
        for key in list(output.keys()):
            output[key] = _cast_floats(output[key], dtype)
    return output


def quantize_(model: nn.Module | DiffusionModel, plan: dict | str | Path, *, fuse: bool = True) -> nn.Module:
    """Swap the Linear/Conv2d layers a plan names for real integer layers, in place (torchao's verb).
    `plan`: plan.json's record or its path; layer names are relative to `model` (a `DiffusionModel`'s
    `.net`). Static activation modes need calibrated ranges: use `quantize(...)` (the stage) for those."""
    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.quantize import plan_entry_problem, swap_planned_layers

    net = _module(model, "quantize_")
    if not isinstance(plan, (dict, str, os.PathLike)):
        raise UsageError(f"diffpro.quantize_: plan has type {type(plan).__name__}; pass plan.json's record (a dict) or its path")
    if not isinstance(plan, dict):
        plan = read_json(Path(plan), "diffpro.plan/1")
    modules = dict(net.named_modules())
    entries = plan.get("layers") or {}
    if not isinstance(entries, dict):
        raise UsageError(f"plan['layers'] has type {type(entries).__name__}; it maps layer names to entries, "
                         f'e.g. {{"blocks.0.attn.to_q": {{"weight_bits": 8, "act_bits": 8, "act_mode": "dynamic"}}}}')
    missing = [n for n in entries if n not in modules]
    if missing:
        raise UsageError(f"the plan names layers this module does not have ({', '.join(missing[:3])}); "
                         f"pass the network the plan was made for")
    for name, entry in entries.items():
        problem = plan_entry_problem(entry, modules[name])
        if problem is not None:
            raise UsageError(f"plan layer {name!r}: {problem}")
    static = [n for n, e in entries.items() if e.get("act_mode") == "static" and int(e.get("act_bits", 8)) < 16
              and int(e.get("weight_bits", 16)) < 16]
    if static:
        raise UsageError(f"{len(static)} layers use static activations, which need calibration: run "
                         f"diffpro.quantize(model, workdir, plan_path=...) or plan with act_mode dynamic")
    swap_planned_layers(net, {name: modules[name] for name in entries}, entries, fuse=fuse)
    install_timestep_hook(net)
    return model


def profile(model: str | DiffusionModel, workdir: str | Path = "diffpro-work", *, trust_code: bool = False, weights=None,
            seed: int = 0, force: bool = False, quiet: bool = True, conditioning=None, prompts=None, negative_prompt: str = "",
            device: str | None = None, **options: Any) -> dict:
    """Per-layer, per-timestep activation statistics; returns profile.json's record."""
    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.profile import SCHEMA, ProfileConfig, run_profile

    ctx = _context(model, workdir, trust_code, weights, seed, force, quiet, conditioning, prompts, negative_prompt, device)
    run_profile(ctx, _config(ProfileConfig, options, seed=seed))
    return read_json(ctx.workdir / "profile" / "profile.json", SCHEMA)


def score(model: str | DiffusionModel | None = None, workdir: str | Path = "diffpro-work", *, trust_code: bool = False,
          weights=None, force: bool = False, quiet: bool = True, conditioning=None, prompts=None, negative_prompt: str = "",
          device: str | None = None, **options: Any) -> dict:
    """Layer sensitivity from the profile in `workdir`; returns scores.json's record."""
    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.score import ScoreConfig, run_score

    ctx = _context(model or "", workdir, trust_code, weights, 0, force, quiet, conditioning, prompts, negative_prompt, device)
    path = run_score(ctx, _config(ScoreConfig, options)).value
    return read_json(path, "diffpro.scores/1")


def prune(model: str | DiffusionModel, workdir: str | Path = "diffpro-work", *, trust_code: bool = False, weights=None,
          seed: int = 0, force: bool = False, quiet: bool = True, conditioning=None, prompts=None, negative_prompt: str = "",
          device: str | None = None, **options: Any) -> dict:
    """Drift-guided timestep subset; returns timesteps.json's record."""
    from diffpro_cli.stages.prune import PruneConfig, run_prune

    ctx = _context(model, workdir, trust_code, weights, seed, force, quiet, conditioning, prompts, negative_prompt, device)
    return run_prune(ctx, _config(PruneConfig, options, seed=seed)).value


def allocate(model: str | DiffusionModel | None = None, workdir: str | Path = "diffpro-work", *, trust_code: bool = False,
             weights=None, force: bool = False, quiet: bool = True, scores_path=None, timesteps_path=None,
             conditioning=None, prompts=None, negative_prompt: str = "", device: str | None = None, **options: Any) -> dict:
    """Per-layer bits and execution paths (and steps, with a latency budget) priced on this machine;
    returns plan.json's record."""
    from diffpro_cli.stages.allocate import AllocateConfig, run_allocate

    ctx = _context(model or "", workdir, trust_code, weights, 0, force, quiet, conditioning, prompts, negative_prompt, device)
    ts = timesteps_path or (ctx.workdir / "timesteps.json" if (ctx.workdir / "timesteps.json").exists() else None)
    return run_allocate(ctx, _config(AllocateConfig, options), scores_path=scores_path, timesteps_path=ts).value


def quantize(model: str | DiffusionModel, workdir: str | Path = "diffpro-work", *, plan_path=None, timesteps_path=None,
             out_dir=None, trust_code: bool = False, weights=None, seed: int = 0, force: bool = False, quiet: bool = True,
             conditioning=None, prompts=None, negative_prompt: str = "", device: str | None = None, **options: Any) -> dict:
    """Write a real integer checkpoint (default WORKDIR/quantized) from plan.json; returns diffpro.json's record."""
    from diffpro_cli.stages.quantize import QuantizeConfig, run_quantize

    ctx = _context(model, workdir, trust_code, weights, seed, force, quiet, conditioning, prompts, negative_prompt, device)
    cfg = _config(QuantizeConfig, options, seed=seed)
    if plan_path is None and cfg.bits is None:
        plan_path = ctx.workdir / "plan.json"
    return run_quantize(ctx, cfg, plan_path=plan_path, timesteps_path=timesteps_path, out_dir=out_dir).value


def bench(model: str | DiffusionModel, workdir: str | Path = "diffpro-work", *, quantized=None, timesteps_path=None,
          trust_code: bool = False, weights=None, seed: int = 0, force: bool = False, quiet: bool = True,
          conditioning=None, prompts=None, negative_prompt: str = "", device: str | None = None, **options: Any) -> dict:
    """Every baseline and the plan, measured in one run; returns bench/report.json's record."""
    from diffpro_cli.artifacts import read_json
    from diffpro_cli.stages.bench import BenchConfig, run_bench

    # the paths given are checked first: a typo fails before any model is loaded
    quantized, timesteps_path = _path_arg("quantized", quantized), _path_arg("timesteps_path", timesteps_path)
    if quantized is not None and not (quantized / "diffpro.json").is_file():
        raise InputError(f"quantized={str(quantized)!r}: no diffpro.json there; pass a checkpoint directory diffpro.quantize wrote")
    if timesteps_path is not None and not timesteps_path.is_file():
        raise InputError(f"timesteps_path={str(timesteps_path)!r}: no such file; run diffpro.prune first or check the path")
    ctx = _context(model, workdir, trust_code, weights, seed, force, quiet, conditioning, prompts, negative_prompt, device)
    if quantized is None and (ctx.workdir / "quantized" / "diffpro.json").exists():
        quantized = ctx.workdir / "quantized"
    if timesteps_path is None and (ctx.workdir / "timesteps.json").exists():
        timesteps_path = ctx.workdir / "timesteps.json"
    if isinstance(options.get("rows"), str):   # "fp32,diffpro" as on the command line
        options["rows"] = [r.strip() for r in options["rows"].split(",") if r.strip()]
    run_bench(ctx, _config(BenchConfig, options, seed=seed), quantized=quantized, timesteps_path=timesteps_path)
    return read_json(ctx.workdir / "bench" / "report.json", "diffpro.report/1")
