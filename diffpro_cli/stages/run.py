"""run: profile → score → prune → allocate → quantize → bench from one TOML config.

Each stage goes through the lock (stages.common.run_stage), so a re-run skips what is up to date and
a run killed mid-stage resumes at that stage: finished artifacts were renamed into place, the
interrupted one was never written.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.errors import InputError, UsageError

STAGES = ("profile", "score", "prune", "allocate", "quantize", "bench")
TOP_KEYS = {"model", "workdir", "seed", "trust_code", "weights", "stages"}


@dataclass
class RunConfig:
    model: str = "builtin:dit-mnist"
    workdir: str = "diffpro-work"
    seed: int = 0
    trust_code: bool = False
    weights: str | None = None
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


def run_pipeline(cfg: RunConfig, *, force: bool = False, ui: UI = QUIET_UI) -> list[dict]:
    """Run the configured stages in order; returns each stage's outcome as a dict."""
    from diffpro_cli.models import load_model

    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from diffpro_cli.artifacts import remove_stale_temp_files

    for p in remove_stale_temp_files(workdir, older_than=time.time() - 1):
        ui.info(f"removed {p}: left by an interrupted earlier run")
    sec = cfg.sections
    check_sections(cfg)   # a typo in [bench] must fail now, not after the stages before it ran
    load_kwargs = {"trust_code": cfg.trust_code, "weights": cfg.weights}
    model = load_model(cfg.model, seed=cfg.seed, **load_kwargs)
    outcomes = []

    def done(outcome):
        outcomes.append(outcome.as_dict())
        ui.info(f"{outcome.stage}: {outcome.status}" + (f" ({outcome.wall_s:.1f} s)" if outcome.status == "computed" else ""))

    if "profile" in cfg.stages:
        from diffpro_cli.stages.profile import ProfileConfig, run_profile

        done(run_profile(model, section(ProfileConfig, sec["profile"], "profile", seed=cfg.seed), workdir, force=force, ui=ui))
    if "score" in cfg.stages:
        from diffpro_cli.stages.score import ScoreConfig, run_score

        outcome, _ = run_score(workdir / "profile", section(ScoreConfig, sec["score"], "score"), workdir,
                               model_spec=cfg.model, force=force, ui=ui, **load_kwargs)
        done(outcome)
    if "prune" in cfg.stages:
        from diffpro_cli.stages.prune import PruneConfig, run_prune

        outcome, _ = run_prune(model, workdir, section(PruneConfig, sec["prune"], "prune", seed=cfg.seed), force=force, ui=ui)
        done(outcome)
    if "allocate" in cfg.stages:
        from diffpro_cli.stages.allocate import AllocateConfig, run_allocate

        ts_path = workdir / "timesteps.json" if (workdir / "timesteps.json").exists() else None
        outcome, _ = run_allocate(workdir / "scores.json", workdir, section(AllocateConfig, sec["allocate"], "allocate"),
                                  timesteps_path=ts_path, force=force, ui=ui)
        done(outcome)
    if "quantize" in cfg.stages:
        from diffpro_cli.stages.quantize import QuantizeConfig, run_quantize_stage

        qsec = dict(sec["quantize"])
        qcfg = section(QuantizeConfig, qsec, "quantize", seed=cfg.seed)
        plan = workdir / "plan.json" if qcfg.bits is None else None
        ts_path = workdir / "timesteps.json" if (workdir / "timesteps.json").exists() else None
        outcome, _ = run_quantize_stage(model, workdir, workdir / "quantized", qcfg, plan_path=plan,
                                        timesteps_path=ts_path, force=force, ui=ui)
        done(outcome)
    if "bench" in cfg.stages:
        from diffpro_cli.stages.bench import BenchConfig, run_bench_stage

        bcfg = section(BenchConfig, sec["bench"], "bench", seed=cfg.seed)
        quantized = workdir / "quantized" if (workdir / "quantized" / "diffpro.json").exists() else None
        ts_path = workdir / "timesteps.json" if (workdir / "timesteps.json").exists() else None
        done(run_bench_stage(cfg.model, workdir, bcfg, quantized=quantized, timesteps_path=ts_path,
                             load_kwargs=load_kwargs, force=force, ui=ui))
    return outcomes
