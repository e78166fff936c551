"""Train a built-in model on MNIST: seeded, resumable from its own checkpoints, time-boxed.

Standard DDPM epsilon-prediction training (linear 1000-step schedule), 10% label drop to the null
class for classifier-free guidance, AdamW with warm-up and cosine decay, EMA of the weights. The EMA
weights are exported as fp16 safetensors with a model card (they load as fp32).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpro_cli.mnist import load_mnist, to_model_space
from diffpro_cli.models.base import linear_alphas_cumprod
from diffpro_cli.models.base import dit_forward, unet_forward
from diffpro_cli.models.builtin import BUILTIN_CONFIGS, build_net


def _lr_at(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


LOSS_WEIGHTINGS = ("uniform", "min-snr")


def loss_weights(alphas_cumprod_t: torch.Tensor, weighting: str, snr_gamma: float | None = 5.0) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE.

    "min-snr" is Min-SNR-gamma (Hang et al., 2023) for epsilon prediction: min(SNR, gamma) / SNR. The
    plain epsilon loss is dominated by the almost-clean timesteps; this weighting moves the effort to the
    mid and high noise levels where a digit's shape is decided, which is what a small DiT lacks.
    """
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if weighting == "min-snr":
        snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
        return snr.clamp(max=snr_gamma) / snr
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def _phase_lr(step: int, phase: dict) -> float:
    """Learning rate inside a training phase: warm-up then cosine decay over the phase's own steps."""
    return _lr_at(step - phase["start"], phase["end"] - phase["start"], phase["lr"], warmup=phase["warmup"])


def train(
    name: str,
    out_dir: Path,
    data_dir: Path | None = None,
    steps: int = 3000,
    batch: int = 128,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    loss_weighting: str = "uniform",
    snr_gamma: float = 5.0,
    seed: int = 0,
    max_minutes: float | None = None,
    checkpoint_every: int = 100,
    threads: int | None = None,
    log=print,
    progress: bool = False,
) -> dict:
    """Train until `steps` (or `max_minutes`), checkpointing to out_dir/ckpt.pt; returns the model card.

    Resuming with the same settings continues the current phase. Resuming with a new total `steps`,
    `lr` or `loss_weighting` starts a new phase at the checkpoint's step (short warm-up, then its own
    cosine decay to `steps`). Every phase is recorded in the checkpoint and the model card.
    """
    from diffpro_cli.artifacts import atomic_torch_save

    if threads:
        torch.set_num_threads(threads)
    spec = BUILTIN_CONFIGS[name]
    forward = dit_forward if spec["class"] == "DiTTransformer2DModel" else unet_forward
    null_class = spec["num_classes"]

    images, labels = load_mnist(data_dir)   # before creating out_dir: bad --data leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    x_all = to_model_space(images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    acp = linear_alphas_cumprod().float()

    net = build_net(name, seed=seed)
    ema = build_net(name, seed=seed)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    for m in net.modules():  # we drop labels ourselves (seeded); stop diffusers' own extra 10% drop
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step, losses, elapsed_before = 0, [], 0.0
    phases: list[dict] = []

    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        net.load_state_dict(ck["net"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, losses, elapsed_before = int(ck["step"]), list(ck["losses"]), float(ck["elapsed"])
        # checkpoints from before phases were recorded: one plain phase up to their step
        phases = [dict(p) for p in ck.get("phases", [])] or [
            dict(start=0, end=step, lr=None, warmup=200, weighting="uniform", snr_gamma=None, batch=None,
                 note="trained before phases were recorded")]
        log(f"resumed {name} at step {step}")
    wanted = dict(end=steps, lr=lr, weighting=loss_weighting,
                  snr_gamma=snr_gamma if loss_weighting == "min-snr" else None, batch=batch)
    if not phases or any(phases[-1].get(k) != v for k, v in wanted.items()):
        if step >= steps:
            raise ValueError(f"the checkpoint is already at step {step}; ask for more --steps to train further")
        phases.append(dict(start=step, warmup=200 if step == 0 else 100, **wanted))
        if step:
            log(f"new training phase from step {step} to {steps}: lr {lr:g}, loss weighting {loss_weighting}")
    phase = phases[-1]

    def save():
        atomic_torch_save({
            "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "gen": gen.get_state(), "step": step, "losses": losses, "phases": phases,
            "elapsed": elapsed_before + time.time() - t0,
        }, ckpt_path)

    t0 = time.time()
    net.train()
    n = x_all.shape[0]
    running = None
    while step < steps:
        if max_minutes is not None and (elapsed_before + time.time() - t0) / 60 > max_minutes:
            log(f"time budget reached at step {step}")
            break
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = null_class
        t = torch.randint(0, acp.shape[0], (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _phase_lr(step, phase)
        pred = forward(net, xt, t, y)[:, : x0.shape[1]]
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(acp[t], phase["weighting"], phase["snr_gamma"])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        step += 1
        losses.append(per_sample.mean().item())  # the plain epsilon MSE, comparable across phases
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        if step % 20 == 0:
            rate = (step * batch) / max(1e-6, elapsed_before + time.time() - t0)
            log(f"step {step}/{steps} loss {running:.4f} lr {_phase_lr(step, phase):.2e} ~{rate:.0f} img/s(avg)")
        if step % checkpoint_every == 0:
            save()
    save()
    return export(name, out_dir, data_dir=data_dir, batch=batch, lr=lr, seed=seed)


def export(name: str, out_dir: Path, data_dir=None, batch=None, lr=None, seed=0) -> dict:
    """Write the EMA weights as fp16 safetensors plus a model card next to them."""
    from safetensors.torch import save_file

    from diffpro_cli.artifacts import atomic_write_json, sha256_file

    ck = torch.load(out_dir / "ckpt.pt", weights_only=True)
    state = {k: v.half().contiguous() for k, v in ck["ema"].items()}
    weights = out_dir / f"{name}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"diffpro": f"builtin:{name}"})
    tmp.replace(weights)
    losses = ck["losses"]
    window = 100
    curve = [float(np.mean(losses[i:i + window])) for i in range(0, len(losses), window)]
    card = {
        "name": f"builtin:{name}",
        "architecture": BUILTIN_CONFIGS[name]["class"],
        "config": BUILTIN_CONFIGS[name]["config"],
        "params": sum(v.numel() for v in state.values()),
        "data": "MNIST test set (10,000 images, 28x28 padded to 32x32, [-1,1]); labels 0-9, null class 10 (10% drop)",
        "objective": "epsilon prediction, linear betas 1e-4..0.02 over 1000 steps; MSE weighted per phase: "
                     + "; ".join(f"steps {p['start']}-{p['end']} {p['weighting']}"
                                 + (f" (gamma {p['snr_gamma']:g})" if p.get("snr_gamma") else "")
                                 for p in ck.get("phases", [])),
        "steps": int(ck["step"]), "batch": batch, "lr": lr, "seed": seed, "ema": True,
        "train_seconds": round(float(ck["elapsed"]), 1), "threads": torch.get_num_threads(),
        "phases": ck.get("phases", []),
        "final_loss": curve[-1] if curve else None,
        "loss_curve_per_100_steps": [round(c, 5) for c in curve],
        "dtype": "float16 (load as float32)",
        "sha256": sha256_file(weights),
    }
    atomic_write_json(weights.with_suffix(".json"), card)
    return card
