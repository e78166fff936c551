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
    if not path.exists():
        raise InputError(f"{path}: no such config; see sample_configs/ for examples")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    unknown = [k for k in raw if k not in TOP_KEYS and k not in STAGES]
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; top-level keys are {', '.join(sorted(TOP_KEYS))} plus sections [{'], ['.join(STAGES)}]")
    cfg = RunConfig(**{k: raw[k] for k in TOP_KEYS if k in raw})
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise UsageError(f"{path}: stages {bad} unknown; choose from {', '.join(STAGES)}")
    cfg.sections = {s: dict(raw.get(s, {})) for s in STAGES}
    for s, sec in cfg.sections.items():
        if not isinstance(sec, dict):
            raise UsageError(f"{path}: [{s}] must be a table")
    # a relative workdir is relative to the current directory (like --workdir), not to the config
    return cfg


def section(cls, values: dict, name: str, **defaults):
    """Build a stage's config dataclass from its TOML table, naming unknown keys."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise UsageError(f"[{name}] unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
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


def check_sections(cfg: RunConfig) -> None:
    """Build every configured stage's config once, so unknown keys are named before any work starts."""
    classes = stage_config_classes()
    for name in cfg.stages:
        section(classes[name], cfg.sections[name], name, seed=cfg.seed)


def run_pipeline(cfg: RunConfig, *, force: bool = False, wait: bool = False, ui: UI = QUIET_UI) -> list[dict]:
    """Run the configured stages in order through one StageContext (the float model is loaded once and
    shared; trust_code and weights reach every load, quantized checkpoints included); returns each
    stage's outcome as a dict."""
    from diffpro_cli.artifacts import workdir_lock
    from diffpro_cli.stages.context import StageContext

    check_sections(cfg)   # a typo in [bench] must fail now, not after the stages before it ran
    ctx = StageContext.create(cfg.model, cfg.workdir, trust_code=cfg.trust_code, weights=cfg.weights, seed=cfg.seed,
                              ui=ui, force=force, wait=wait, conditioning=cfg.conditioning,
                              prompts=cfg.prompts, negative_prompt=cfg.negative_prompt, device=cfg.device)
    ctx.model()           # load errors (bad spec, untrusted code) before any stage runs or anything is written
    ctx.workdir.mkdir(parents=True, exist_ok=True)
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
        quantized = ctx.workdir / "quantized" if (ctx.workdir / "quantized" / "diffpro.json").exists() else None
        return run_bench(ctx, c, quantized=quantized, timesteps_path=_existing(ctx.workdir / "timesteps.json"))

    return {"profile": run_profile, "score": run_score, "prune": run_prune, "allocate": allocate,
            "quantize": quantize, "bench": bench}
