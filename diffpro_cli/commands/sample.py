from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import (
    Conditioning,
    Device,
    JsonOut,
    ModelArg,
    NegativePrompt,
    Prompts,
    Quiet,
    Seed,
    TrustCode,
    Weights,
    attach_conditioning,
    make_ui,
)
from diffpro_cli.errors import UsageError


def sample_cmd(
    model: ModelArg = "builtin:dit-mnist",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Number of uniformly spaced timesteps (default: a quantized checkpoint's own timesteps, else 50).")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 16,
    out: Annotated[Path, typer.Option("--out", help="PNG grid path; raw samples go next to it as .safetensors.")] = Path("samples.png"),
    method: Annotated[str, typer.Option("--method", help="ddim or ddpm; flow-matching models: euler (or ddim with eta 0).")] = "ddim",
    eta: Annotated[float, typer.Option("--eta", help="DDIM eta, 0 (deterministic) to 1 (DDPM-like noise).")] = 0.0,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = off).")] = 1.0,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Comma list of class labels (cycled); default i % classes.")] = None,
    timesteps_file: Annotated[Optional[Path], typer.Option("--timesteps", help="timesteps.json from `diffpro prune` (overrides --steps).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch size (does not change the samples).")] = 16,
    seed: Seed = 0,
    trust_code: TrustCode = False,
    weights: Weights = None,
    conditioning: Conditioning = None,
    prompts: Prompts = None,
    negative_prompt: NegativePrompt = "",
    device: Device = "cpu",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Run a quantized checkpoint's cache schedule (reused computation across steps), on its timesteps.")] = True,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Generate samples and write an image grid plus the raw samples."""
    import math

    import torch

    from diffpro_cli.artifacts import atomic_save_safetensors
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import (
        SamplerConfig,
        check_guidance,
        check_method,
        sample,
        save_grid,
        uniform_timesteps,
    )

    ui = make_ui(quiet, json_output)
    if n < 1 or batch < 1:
        raise UsageError("--n and --batch must be at least 1")
    if out.suffix.lower() != ".png":   # the grid is written as PNG whatever the name says
        raise UsageError(f"--out {out}: the grid is a PNG; give a path ending in .png")
    if method not in ("ddim", "ddpm", "euler"):   # which of them fits the model: sampling.check_method, once loaded
        raise UsageError(f"--method {method}: unknown sampler; use ddim or ddpm (euler for flow-matching models)")
    if not (math.isfinite(eta) and 0 <= eta <= 1):   # a negative or NaN eta silently bent the DDIM update
        raise UsageError(f"--eta {eta}: must be between 0 (deterministic DDIM) and 1 (DDPM-like noise)")
    check_guidance(cfg_scale)
    m = load_model(model, trust_code=trust_code, weights=weights, seed=seed, device=device)
    attach_conditioning(m, conditioning, prompts, negative_prompt, device=device)
    if m.untrained:
        ui.warn(f"{m.spec} is UNTRAINED (seeded random weights): samples are noise-like")
    from diffpro_cli.cache import install_cache, model_cache_record, record_policy

    policy = record_policy(model_cache_record(m)) if cache else None
    if timesteps_file is not None:
        ts = _timesteps_for(timesteps_file, m)
    elif policy is not None and steps is None:
        ts = list(policy.timesteps)
    elif steps is None and m.config.get("quantized_from") and m.config.get("timesteps") is not None:
        ts = _checkpoint_timesteps(model, m)   # the plan's drift-selected steps, as bench's diffpro row runs them
    else:
        ts = uniform_timesteps(m.num_train_timesteps, 50 if steps is None else steps)
    if policy is not None:
        if sorted(int(t) for t in ts) != policy.timesteps:
            raise UsageError(f"{model}: its cache schedule runs its own {len(policy.timesteps)} timesteps; drop "
                             "--steps/--timesteps, or pass --no-cache to compute every step in full")
        install_cache(m, policy)
    y = None
    if labels:
        if m.conditioning == "embeddings":   # was told "is unconditional"
            raise UsageError(f"--labels: {m.spec} is conditioned on text, not class labels; drop --labels and pass "
                             "--prompts FILE (or --conditioning FILE)")
        if m.num_classes is None:
            raise UsageError(f"--labels: {m.spec} is unconditional; drop --labels")
        try:
            vals = [int(v) for v in labels.split(",")]
        except ValueError:
            raise UsageError(f"--labels {labels!r}: use a comma list of integers like 0,1,2") from None
        if any(not 0 <= v < m.num_classes for v in vals):
            raise UsageError(f"--labels: classes must be in 0..{m.num_classes - 1}")
        y = torch.tensor([vals[i % len(vals)] for i in range(n)])
    cfg = SamplerConfig(method=method, eta=eta, cfg_scale=cfg_scale)
    check_method(m, cfg)
    raw = out.with_suffix(".safetensors")
    _check_outputs(out, raw)   # before sampling: a blocked .safetensors left the .png written and nothing else
    with ui.progress("sampling", total=n * len(ts)) as advance:
        x = sample(m, n, ts, cfg, labels=y, seed=seed, batch_size=batch, advance=advance)
    save_grid(x, out)
    tensors = {"samples": x.float()}
    if y is not None or m.num_classes is not None:
        from diffpro_cli.sampling import default_labels

        tensors["labels"] = y if y is not None else default_labels(m, n)
    run = getattr(m.net, "_diffpro_cache", None)
    meta = {"model": m.spec, "model_sha256": str(m.sha256), "seed": str(seed), "timesteps": ",".join(map(str, ts)),
            "sampler": str(cfg.as_dict()), "untrained": str(m.untrained), "device": str(device),
            "compute_fraction": str(None if run is None else run.compute_fraction)}
    atomic_save_safetensors(raw, tensors, metadata=meta)
    ui.result({"grid": str(out), "samples": str(raw), "n": n, "steps": len(ts), "model": m.spec,
               "untrained": m.untrained, "seed": seed, "compute_fraction": None if run is None else run.compute_fraction},
              human=f"wrote {out} and {raw} ({n} samples, {len(ts)} steps{', UNTRAINED model' if m.untrained else ''})")


def _check_outputs(out: Path, raw: Path) -> None:
    """The grid and the raw samples can both be written (neither is a directory, their folder can take a file)."""
    from diffpro_cli.artifacts import writable_dir

    for path in (out, raw):
        if path.is_dir():
            raise UsageError(f"{path}: cannot write there (a directory of that name exists); choose another --out")
    writable_dir(out.parent)


def _timesteps_for(path: Path, m) -> list[int]:
    """A timesteps.json's validated timesteps, refused when pruned for another model, as quantize and bench
    refuse it; a quantized checkpoint also takes the file pruned for the model it was quantized from."""
    from types import SimpleNamespace

    from diffpro_cli.errors import InputError
    from diffpro_cli.sampling import read_timesteps_file
    from diffpro_cli.stages.quantize import check_same_model

    doc, ts = read_timesteps_file(path, m.num_train_timesteps)
    recorded = doc.get("model")   # check_same_model refuses one that is not a JSON object
    source = m.config.get("quantized_from")
    try:
        check_same_model(str(path), recorded, m)
    except InputError:
        if source is None:
            raise
        check_same_model(str(path), recorded, SimpleNamespace(spec=source, sha256=m.config.get("model_sha256"),
                                                              untrained=m.untrained))
    return ts


def _checkpoint_timesteps(spec, m) -> list[int]:
    """The timesteps a quantized checkpoint was made for (quantize --timesteps / a plan's); 50 uniform steps
    used to run instead, 10x the work of a 5-step plan and not the schedule bench measured."""
    from diffpro_cli.errors import InputError
    from diffpro_cli.sampling import timesteps_of

    where = Path(spec) / "diffpro.json"
    if not isinstance(m.config["timesteps"], list):
        raise InputError(f"{where}: 'timesteps' is not a list; re-run `diffpro quantize`, or pass --steps / --timesteps")
    return timesteps_of(m.config, where, m.num_train_timesteps)
