"""Train a built-in model on MNIST: seeded, resumable from its own checkpoints, time-boxed.

Standard DDPM epsilon-prediction training (linear 1000-step schedule), 10% label drop to the null
class for classifier-free guidance, AdamW with warm-up and cosine decay, EMA of the weights. The EMA
weights are exported as fp16 safetensors with a model card (they load as fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpro_cli.models.base import dit_forward, linear_alphas_cumprod, unet_forward
from diffpro_cli.models.builtin import BUILTIN_CONFIGS, build_net
from diffpro_cli.train_loop import (
    Trainer,
    load_training_images,
    save_fp16_weights,
    warmup_cosine_lr,
    write_model_card,
)

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
    return warmup_cosine_lr(step - phase["start"], phase["end"] - phase["start"], phase["lr"], warmup=phase["warmup"])


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
    spec = BUILTIN_CONFIGS[name]
    forward = dit_forward if spec["class"] == "DiTTransformer2DModel" else unet_forward
    null_class = spec["num_classes"]

    x_all, labels = load_training_images(data_dir, out_dir, threads)
    y_all = torch.from_numpy(labels.astype(np.int64))
    acp = linear_alphas_cumprod().float()

    net = build_net(name, seed=seed)
    for m in net.modules():  # we drop labels ourselves (seeded); stop diffusers' own extra 10% drop
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    trainer = Trainer(net, build_net(name, seed=seed), lr=lr, seed=seed, ckpt_path=out_dir / "ckpt.pt",
                      model_key="net", log=log)
    phases: list[dict] = []

    def same_seed(ck):
        # the generator's state comes from the checkpoint: another --seed would change nothing but the card's label
        if ck.get("seed", seed) != seed:
            raise ValueError(f"{out_dir / 'ckpt.pt'} was trained with --seed {ck['seed']}; resume with --seed {ck['seed']} "
                             "or use another --out")

    ck = trainer.resume(name, check=same_seed)
    if ck is not None:
        # checkpoints from before phases were recorded: one plain phase up to their step
        phases = [dict(p) for p in ck.get("phases", [])] or [
            {"start": 0, "end": trainer.step, "lr": None, "warmup": 200, "weighting": "uniform", "snr_gamma": None,
             "batch": None, "note": "trained before phases were recorded"}]
    step = trainer.step
    wanted = {"end": steps, "lr": lr, "weighting": loss_weighting,
              "snr_gamma": snr_gamma if loss_weighting == "min-snr" else None, "batch": batch}
    if not phases or any(phases[-1].get(k) != v for k, v in wanted.items()):
        if step >= steps:
            raise ValueError(f"the checkpoint is already at step {step}; ask for more --steps to train further")
        phases.append(dict(start=step, warmup=200 if step == 0 else 100, **wanted))
        if step:
            log(f"new training phase from step {step} to {steps}: lr {lr:g}, loss weighting {loss_weighting}")
    phase = phases[-1]
    gen = trainer.gen

    def batch_loss(net, x0, idx):
        """Epsilon MSE on a noised batch, 10% of labels dropped to the null class; records the unweighted MSE
        (comparable across phases)."""
        y = y_all[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = null_class
        t = torch.randint(0, acp.shape[0], (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = forward(net, xt, t, y)[:, : x0.shape[1]]
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(acp[t], phase["weighting"], phase["snr_gamma"])).mean()
        return loss, per_sample.mean()

    trainer.run(x_all, steps=steps, batch=batch, ema_decay=ema_decay, lr_at=lambda s: _phase_lr(s, phase),
                batch_loss=batch_loss, extra_state=lambda: {"phases": phases, "seed": seed}, max_minutes=max_minutes,
                checkpoint_every=checkpoint_every)
    return export(name, out_dir, data_dir=data_dir, batch=batch, lr=lr, seed=seed)


def export(name: str, out_dir: Path, data_dir=None, batch=None, lr=None, seed=0) -> dict:
    """Write the EMA weights as fp16 safetensors plus a model card next to them."""
    ck = torch.load(out_dir / "ckpt.pt", weights_only=True)
    weights = out_dir / f"{name}.safetensors"
    state = save_fp16_weights(ck["ema"], weights, name)
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
    }
    return write_model_card(weights, card, ck["losses"])
