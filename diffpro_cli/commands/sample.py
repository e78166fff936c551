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
    steps: Annotated[Optional[int], typer.Option("--steps", help="Number of uniformly spaced timesteps (default 50, or a cached checkpoint's own).")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 16,
    out: Annotated[Path, typer.Option("--out", help="PNG grid path; raw samples go next to it as .safetensors.")] = Path("samples.png"),
    method: Annotated[str, typer.Option("--method", help="ddim or ddpm.")] = "ddim",
    eta: Annotated[float, typer.Option("--eta", help="DDIM eta (0 = deterministic).")] = 0.0,
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
    import torch

    from diffpro_cli.artifacts import atomic_save_safetensors
    from diffpro_cli.loading import load_model
    from diffpro_cli.sampling import (
        SamplerConfig,
        read_timesteps_file,
        sample,
        save_grid,
        uniform_timesteps,
    )

    ui = make_ui(quiet, json_output)
    if n < 1 or batch < 1:
        raise UsageError("--n and --batch must be at least 1")
    if out.suffix.lower() != ".png":   # the grid is written as PNG whatever the name says
        raise UsageError(f"--out {out}: the grid is a PNG; give a path ending in .png")
    if method not in ("ddim", "ddpm"):
        raise UsageError(f"--method {method}: unknown sampler; use ddim or ddpm")
    m = load_model(model, trust_code=trust_code, weights=weights, seed=seed, device=device)
    attach_conditioning(m, conditioning, prompts, negative_prompt, device=device)
    if m.untrained:
        ui.warn(f"{m.spec} is UNTRAINED (seeded random weights): samples are noise-like")
    from diffpro_cli.cache import install_cache, model_cache_record, record_policy

    policy = record_policy(model_cache_record(m)) if cache else None
    if timesteps_file is not None:
        ts = read_timesteps_file(timesteps_file, m.num_train_timesteps)[1]
    elif policy is not None and steps is None:
        ts = list(policy.timesteps)
    else:
        ts = uniform_timesteps(m.num_train_timesteps, 50 if steps is None else steps)
    if policy is not None:
        if sorted(int(t) for t in ts) != policy.timesteps:
            raise UsageError(f"{model}: its cache schedule runs its own {len(policy.timesteps)} timesteps; drop "
                             "--steps/--timesteps, or pass --no-cache to compute every step in full")
        install_cache(m, policy)
    y = None
    if labels:
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
    with ui.progress("sampling", total=n * len(ts)) as advance:
        x = sample(m, n, ts, cfg, labels=y, seed=seed, batch_size=batch, advance=advance)
    save_grid(x, out)
    raw = out.with_suffix(".safetensors")
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
