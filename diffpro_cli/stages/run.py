"""run: profile → score → prune → allocate → quantize → bench from one TOML config.

Each stage goes through the lock (stages.common.run_stage), so a re-run skips what is up to date and
a run killed mid-stage resumes at that stage: finished artifacts were renamed into place, the
interrupted one was never written.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.stages.context import check_seed

STAGES = ("profile", "score", "prune", "allocate", "quantize", "bench")
TOP_KEYS = {"model", "workdir", "seed", "trust_code", "weights", "conditioning", "prompts", "negative_prompt", "device", "stages"}


@dataclass
class RunConfig:
    model: str = "builtin:dit-mnist"
    workdir: str = "diffpro-work"
    seed: int = 0
    trust_code: bool = False
    weights: str | None = None
    conditioning: str | None = None      # prompt embeddings file for text-conditioned models
    prompts: str | None = None           # or a prompts file encoded with the pipeline's text encoders
    negative_prompt: str = ""
    device: str = "cpu"                  # cpu, cuda or cuda:N: where every stage computes
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    sections: dict[str, dict] = field(default_factory=dict)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file; see sample_configs/ for examples")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    unknown = [k for k in raw if k not in TOP_KEYS and k not in STAGES]
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; top-level keys are {', '.join(sorted(TOP_KEYS))} plus sections [{'], ['.join(STAGES)}]")
    check_types(RunConfig, {k: raw[k] for k in TOP_KEYS if k in raw}, str(path))
    cfg = RunConfig(**{k: raw[k] for k in TOP_KEYS if k in raw})
    check_seed(cfg.seed, f"{path}: seed")
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise UsageError(f"{path}: stages {bad} unknown; choose from {', '.join(STAGES)}")
    if not cfg.stages:   # ran nothing and reported "done"
        raise UsageError(f"{path}: stages = [] runs nothing; list at least one of {', '.join(STAGES)} (or drop the key for all)")
    for s in STAGES:
        if not isinstance(raw.get(s, {}), dict):
            raise UsageError(f"{path}: {s} must be a [{s}] table, not a value")
    cfg.sections = {s: dict(raw.get(s, {})) for s in STAGES}
    # a relative workdir is relative to the current directory (like --workdir), not to the config
    check_relative_paths(path, raw)
    return cfg


# the keys that name files ([section] → keys; None: the top level)
PATH_KEYS = {None: ("model", "weights", "conditioning", "prompts"), "allocate": ("cost_table",),
             "bench": ("reference", "inception_weights")}


def check_relative_paths(path: Path, raw: dict) -> None:
    """Paths in a config are read relative to the current directory, as on the command line. One that is
    missing there but exists beside the config (prompts = "digits.txt" next to run.toml, run from elsewhere)
    is named with both fixes, instead of the stage's bare 'no such file'."""
    here, cwd = path.resolve().parent, Path.cwd().resolve()
    if here == cwd:
        return
    for name, keys in PATH_KEYS.items():
        table = raw if name is None else raw.get(name, {})
        for key in keys:
            value = table.get(key)
            if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
                continue
            if (here / value).exists():
                where = key if name is None else f"[{name}] {key}"
                raise InputError(f"{path}: {where} = {value!r} is read relative to the current directory ({cwd}), where "
                                 f"it does not exist; it is beside the config: write {key} = {str(here / value)!r} or run from {here}")


def type_fits(value, tp) -> bool:
    """Whether a value fits a config field's annotation (simple types, lists, optionals; else yes): a TOML
    value here, and a Python argument of the library's stage functions (api._config), where numpy numbers
    and tuples count as numbers and lists."""
    import numbers
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple)) and all(type_fits(v, args[0]) for v in value) if args and args[-1] is not Ellipsis \
            else isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def check_types(cls, values: dict, where: str) -> None:
    """A wrongly typed TOML value (samples = "four", figures = "no") is one usage error naming it, not a
    crash inside a stage or a string taken as true."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: leave the stage's own checks
        return
    for key, value in values.items():
        tp = hints.get(key)
        if tp is not None and not type_fits(value, tp):
            shown = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise UsageError(f"{where}: {key} = {value!r} has the wrong type (expected {shown}); fix the config")


def section(cls, values: dict, name: str, **defaults):
    """Build a stage's config dataclass from its TOML table, naming unknown keys and wrongly typed values."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise UsageError(f"[{name}] unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    check_types(cls, values, f"[{name}]")
    if "seed" in values:
        check_seed(values["seed"], f"[{name}] seed")
    return cls(**{**{k: v for k, v in defaults.items() if k in fields}, **values})


def stage_config_classes() -> dict:
    from diffpro_cli.stages.allocate import AllocateConfig
    from diffpro_cli.stages.bench import BenchConfig
    from diffpro_cli.stages.profile import ProfileConfig
    from diffpro_cli.stages.prune import PruneConfig
    from diffpro_cli.stages.quantize import QuantizeConfig
    from diffpro_cli.stages.score import ScoreConfig

    return {"profile": ProfileConfig, "score": ScoreConfig, "prune": PruneConfig, "allocate": AllocateConfig,
            "quantize": QuantizeConfig, "bench": BenchConfig}


def check_sections(cfg: RunConfig) -> dict:
    """Build every stage's config once, so unknown keys are named before any work starts: the sections of
    stages this run skips too (a typo there surfaced only on the run that included them). Returns the
    configs of the stages that run."""
    classes = stage_config_classes()
    built = {name: section(classes[name], cfg.sections[name], name, seed=cfg.seed) for name in STAGES}
    built = {name: c for name, c in built.items() if name in cfg.stages}
    check_quantize_plan_options(built)
    return built


def check_values(built: dict, model) -> None:
    """The running stages' own option checks, before the first stage runs: `[prune] steps = 1` or a bad
    `[allocate] method` failed only when that stage's turn came, after the stages before it had run.
    Each error is prefixed with its section."""
    from diffpro_cli.stages import allocate, bench_options, profile, prune, quantize, score

    checks = {"profile": profile.validate_config, "score": score.validate_config, "allocate": allocate.validate_config,
              "prune": lambda c: prune.validate_config(c, model.num_train_timesteps), "quantize": quantize.validate_config,
              "bench": bench_options.validate_config}
    for name, stage_cfg in built.items():
        if name in checks:
            try:
                checks[name](stage_cfg)
            except UsageError as exc:
                raise UsageError(f"[{name}] {exc.message}") from None


def check_quantize_plan_options(built: dict) -> None:
    """[quantize] beside a plan (no `bits`): what quantize --plan refuses (stages.quantize.check_plan_options),
    refused before profile, score and allocate have run rather than at the quantize stage."""
    q, a = built.get("quantize"), built.get("allocate")
    if q is None or q.bits is not None:
        return
    for key in ("act_bits", "group_size"):
        if getattr(q, key) is not None:
            raise UsageError(f"[quantize] {key} = {getattr(q, key)!r}: applies with `bits` only; the plan sets it per layer "
                             f"(set it in [allocate]), or remove it")
    if a is not None and q.act_mode is not None and q.act_mode != a.act_mode and 8 in a.act_bits:
        raise UsageError(f"[quantize] act_mode = {q.act_mode!r}: [allocate] plans the integer layers with "
                         f"{a.act_mode!r} activations; set act_mode = {q.act_mode!r} in [allocate], or remove it from [quantize]")


def run_pipeline(cfg: RunConfig, *, force: bool = False, wait: bool = False, ui: UI = QUIET_UI) -> list[dict]:
    """Run the configured stages in order through one StageContext (the float model is loaded once and
    shared; trust_code and weights reach every load, quantized checkpoints included); returns each
    stage's outcome as a dict."""
    from diffpro_cli.artifacts import ensure_dir, workdir_lock
    from diffpro_cli.stages.context import StageContext

    built = check_sections(cfg)   # a typo in [bench] must fail now, not after the stages before it ran
    ctx = StageContext.create(cfg.model, cfg.workdir, trust_code=cfg.trust_code, weights=cfg.weights, seed=cfg.seed,
                              ui=ui, force=force, wait=wait, conditioning=cfg.conditioning,
                              prompts=cfg.prompts, negative_prompt=cfg.negative_prompt, device=cfg.device)
    check_values(built, ctx.model())   # load errors (bad spec, untrusted code), then out-of-range options, before any stage
    ensure_dir(ctx.workdir)
    classes = stage_config_classes()
    runners = _runners()
    outcomes = []
    # one run holds the workdir for all its stages: a concurrent run waits (--wait) or exits 2
    with workdir_lock(ctx.workdir, wait=wait, ui=ui):
        _clean_temp_files(ctx)
        for name in STAGES:
            if name not in cfg.stages:
                continue
            stage_cfg = section(classes[name], cfg.sections[name], name, seed=cfg.seed)
            if name == "allocate" and "check_rounding" not in cfg.sections["allocate"]:
                # allocate's check quantizes as the quantize stage will
                stage_cfg.check_rounding = section(classes["quantize"], cfg.sections["quantize"], "quantize", seed=cfg.seed).rounding
            outcome = runners[name](ctx, stage_cfg).outcome
            outcomes.append(outcome.as_dict())
            ui.info(f"{outcome.stage}: {outcome.status}" + (f" ({outcome.wall_s:.1f} s)" if outcome.status == "computed" else ""))
    return outcomes


def _clean_temp_files(ctx) -> None:
    """Temp files an interrupted earlier run left behind; only removed while holding the workdir lock,
    so a concurrent stage's live temp file is never touched."""
    from diffpro_cli.artifacts import clean_stale_temp_files

    clean_stale_temp_files(ctx.workdir, ctx.ui)


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _runners() -> dict:
    """Stage name → fn(ctx, cfg): each wires the previous stages' artifacts in the workdir as inputs."""
    from diffpro_cli.stages.allocate import run_allocate
    from diffpro_cli.stages.bench import run_bench
    from diffpro_cli.stages.profile import run_profile
    from diffpro_cli.stages.prune import run_prune
    from diffpro_cli.stages.quantize import run_quantize
    from diffpro_cli.stages.score import run_score

    def allocate(ctx, c):
        return run_allocate(ctx, c, timesteps_path=_existing(ctx.workdir / "timesteps.json"))

    def quantize(ctx, c):
        plan = ctx.workdir / "plan.json" if c.bits is None else None
        return run_quantize(ctx, c, plan_path=plan, timesteps_path=_existing(ctx.workdir / "timesteps.json"))

    def bench(ctx, c):
        from diffpro_cli.stages.bench_options import default_inputs

        quantized, timesteps = default_inputs(ctx.workdir)
        return run_bench(ctx, c, quantized=quantized, timesteps_path=timesteps)

    return {"profile": run_profile, "score": run_score, "prune": run_prune, "allocate": allocate,
            "quantize": quantize, "bench": bench}
