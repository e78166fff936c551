"""bench's option checks, one `error:` line each, in one function: `diffpro bench` calls it before loading
anything, and `run` before its first stage (a `[bench] repeats = 0` used to end in a StatisticsError
traceback after every stage before bench had run), and the default inputs `diffpro bench` and `run` wire in."""

from __future__ import annotations


from diffpro_cli.errors import UsageError


def validate_config(cfg) -> None:
    """`cfg`: a stages.bench.BenchConfig."""
    from diffpro_cli.sampling import check_guidance
    from diffpro_cli.stages.bench import ALL_ROWS, CACHE_ROWS

    bad = [r for r in cfg.rows if r not in ALL_ROWS + CACHE_ROWS]
    if bad:
        raise UsageError(f"--rows: unknown row(s) {', '.join(bad)}; choose from {', '.join(ALL_ROWS + CACHE_ROWS)}")
    if cfg.repeats < 1 or cfg.latency_batch < 1 or cfg.fid_n < 2 or cfg.reference_steps < 1:
        raise UsageError("--repeats, --latency-batch, --reference-steps must be ≥ 1 and --fid-n ≥ 2")
    if (cfg.steps is not None and cfg.steps < 1) or (cfg.latency_steps is not None and cfg.latency_steps < 1):
        raise UsageError("--steps and --latency-steps must be at least 1 when given")
    if cfg.sample_batch < 1 or cfg.grid_n < 1:   # config keys only ([bench] sample_batch, grid_n)
        raise UsageError(f"sample_batch {cfg.sample_batch} / grid_n {cfg.grid_n}: each must be at least 1")
    if cfg.method not in ("ddim", "ddpm", "euler"):
        raise UsageError(f"--method {cfg.method}: use ddim or ddpm (euler for flow-matching models)")
    check_guidance(cfg.cfg_scale)


def default_inputs(workdir, quantized=None, timesteps=None):
    """(checkpoint, timesteps.json) for bench, as `diffpro bench` and `run` wire them: the ones given, else
    WORKDIR/quantized where it holds a checkpoint and default_timesteps' file."""
    from pathlib import Path

    if quantized is None and (Path(workdir) / "quantized" / "diffpro.json").exists():
        quantized = Path(workdir) / "quantized"
    return quantized, timesteps if timesteps is not None else default_timesteps(workdir, quantized)


def default_timesteps(workdir, quantized):
    """WORKDIR/timesteps.json for the diffpro row when it holds the checkpoint's own steps (or the checkpoint
    records none); None when the checkpoint chose other steps (a joint plan: allocate --budget latency=...),
    which then come from the checkpoint. Before, the file's subset silently replaced the plan's choice."""
    import json
    from pathlib import Path

    path = Path(workdir) / "timesteps.json"
    if not path.exists():
        return None
    if quantized is None:
        return path
    try:
        own = json.loads((Path(quantized) / "diffpro.json").read_text()).get("timesteps")
        listed = json.loads(path.read_text()).get("timesteps")
    except (OSError, ValueError, AttributeError):
        return path   # unreadable: the stage's own reads say what is wrong
    return path if not own or own == listed else None


def checkpoint_identity(meta: dict) -> str:
    """What a quantized checkpoint's samples depend on, for bench's row caches: its provenance (tensors,
    plan, timesteps, inputs) without the write time and the plan's check note, so re-quantizing to the
    same tensors keeps the cached FID features (the whole provenance, `created` included, was the key)."""
    from diffpro_cli.artifacts import sha256_json

    prov = meta.get("provenance", {})
    return sha256_json({k: v for k, v in prov.items() if k not in ("created", "plan_check")})
