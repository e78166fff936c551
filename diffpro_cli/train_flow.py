"""Train builtin:flow-mnist: rectified-flow (flow-matching) training of a small SD3-style MMDiT with its word encoder.

x_σ = (1 − σ)·x0 + σ·ε, the network predicts the velocity v = ε − x0 at timestep σ·1000 (SD3's
convention); σ is drawn logit-normal (σ = sigmoid(n), n ~ N(0, 1), as in SD3) and then shifted with
the model's `shift`. Prompts come from templates (builtin_text.TEMPLATES) naming each image's digit,
seeded; 10% are dropped to the empty prompt for classifier-free guidance. The word encoder's tables
are trained jointly. AdamW with warm-up and cosine decay (train._lr_at), EMA of the weights, seeded,
resumable from out_dir/ckpt.pt, time-boxed. The EMA weights (network + encoder) are exported as fp16
safetensors with a model card.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpro_cli.mnist import load_mnist, to_model_space
from diffpro_cli.models import builtin_text
from diffpro_cli.models.builtin import BUILTIN_CONFIGS, build_net
from diffpro_cli.train import _lr_at

NAME = "flow-mnist"
PROMPT_DROP = 0.1


class _Joint(torch.nn.Module):
    """Network + word encoder as one module, so one optimizer / EMA / state dict covers both."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = build_net(NAME, seed=seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            self.text_encoder = builtin_text.WordEncoder()

    def forward(self, x, timestep, ids):
        hidden, pooled = self.text_encoder(ids)
        return self.net(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                        timestep=timestep, return_dict=False)[0]


def shifted_sigmas(n: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = shift·s / (1 + (shift − 1)·s) with s = sigmoid(n) (logit-normal, then the schedule's shift)."""
    s = torch.sigmoid(n)
    return shift * s / (1 + (shift - 1) * s)


def train_flow(out_dir: Path, data_dir: Path | None = None, steps: int = 3000, batch: int = 64, lr: float = 8e-4,
               ema_decay: float = 0.998, seed: int = 0, max_minutes: float | None = None, checkpoint_every: int = 100,
               threads: int | None = None, log=print) -> dict:
    """Train until `steps` (or `max_minutes` of training time), checkpointing to out_dir/ckpt.pt; returns the model card.
    Resuming continues from the checkpoint with the same settings (a different `steps`/`batch`/`lr` is refused)."""
    from diffpro_cli.artifacts import atomic_torch_save

    if threads:
        torch.set_num_threads(threads)
    shift = float(BUILTIN_CONFIGS[NAME]["flow_shift"])
    images, labels = load_mnist(data_dir)   # before creating out_dir: bad --data leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    x_all = to_model_space(images)
    y_all = labels.astype(np.int64)

    model, ema = _Joint(seed), _Joint(seed)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)                 # prompt templates and drops
    settings = {"steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed, "shift": shift}
    step, losses, elapsed_before = 0, [], 0.0

    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        if ck["settings"] != settings:
            raise ValueError(f"{ckpt_path} was trained with {ck['settings']}; resume with the same settings or use another --out")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        rng.setstate(_rng_state(ck["rng"]))
        step, losses, elapsed_before = int(ck["step"]), list(ck["losses"]), float(ck["elapsed"])
        log(f"resumed {NAME} at step {step}")

    def save():
        atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                           "gen": gen.get_state(), "rng": _rng_list(rng.getstate()), "step": step, "losses": losses,
                           "elapsed": elapsed_before + time.time() - t0, "settings": settings,
                           "threads": torch.get_num_threads()}, ckpt_path)

    t0 = time.time()
    model.train()
    n = x_all.shape[0]
    running = None
    while step < steps:
        if max_minutes is not None and (elapsed_before + time.time() - t0) / 60 > max_minutes:
            log(f"time budget reached at step {step}")
            break
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = x_all[idx]
        prompts = ["" if rng.random() < PROMPT_DROP else builtin_text.prompt_for(int(y_all[i]), rng) for i in idx.tolist()]
        ids = builtin_text.token_ids(prompts)
        sigma = shifted_sigmas(torch.randn(batch, generator=gen), shift)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        pred = model(xt, sigma * 1000, ids)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pn, 1 - decay)
        step += 1
        losses.append(loss.item())
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        if step % 20 == 0:
            rate = step * batch / max(1e-6, elapsed_before + time.time() - t0)
            log(f"step {step}/{steps} loss {running:.4f} lr {_lr_at(step, steps, lr):.2e} ~{rate:.0f} img/s(avg)")
        if step % checkpoint_every == 0:
            save()
    save()
    return export_flow(out_dir, data_dir=data_dir)


def _rng_list(state):
    """random.Random state as nested lists/ints (weights_only checkpoints store no tuples of objects)."""
    return [state[0], list(state[1]), state[2]]


def _rng_state(saved):
    return (int(saved[0]), tuple(int(v) for v in saved[1]), saved[2])


def export_flow(out_dir: Path, data_dir=None) -> dict:
    """Write the EMA weights (network, then the encoder under `text_encoder.`) as fp16 safetensors plus a model card."""
    from safetensors.torch import save_file

    from diffpro_cli.artifacts import atomic_write_json, sha256_file

    ck = torch.load(out_dir / "ckpt.pt", weights_only=True)
    state = {}
    for k, v in ck["ema"].items():
        key = k.removeprefix("net.")   # text_encoder.* keeps its prefix
        state[key] = v.half().contiguous()
    weights = out_dir / f"{NAME}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"diffpro": f"builtin:{NAME}"})
    tmp.replace(weights)
    losses, st = ck["losses"], ck["settings"]
    window = 100
    curve = [float(np.mean(losses[i:i + window])) for i in range(0, len(losses), window)]
    spec = BUILTIN_CONFIGS[NAME]
    card = {
        "name": f"builtin:{NAME}",
        "architecture": spec["class"],
        "config": spec["config"],
        "text_encoder": {"name": builtin_text.NAME, "vocab_size": builtin_text.VOCAB_SIZE, "max_tokens": builtin_text.MAX_TOKENS,
                         "dim": builtin_text.DIM, "params": sum(v.numel() for k, v in state.items() if k.startswith(builtin_text.PREFIX)),
                         "templates": list(builtin_text.TEMPLATES), "prompt_drop": PROMPT_DROP},
        "params": sum(v.numel() for k, v in state.items() if not k.startswith(builtin_text.PREFIX)),
        "data": "MNIST test set (10,000 images, 28x28 padded to 32x32, [-1,1]); prompts from templates naming the digit "
                f"(word or numeral), {int(PROMPT_DROP * 100)}% dropped to the empty prompt",
        "objective": f"rectified flow: x_s = (1-s)x0 + s*eps, velocity target eps - x0, plain MSE; s logit-normal(0, 1) "
                     f"shifted with shift {st['shift']:g}; network timestep s*1000",
        "flow_shift": st["shift"],
        "steps": int(ck["step"]), "planned_steps": st["steps"], "batch": st["batch"], "lr": st["lr"],
        "lr_schedule": "200-step warm-up, cosine to 10% over planned_steps", "optimizer": "AdamW (weight decay 0), grad clip 1.0",
        "ema_decay": st["ema_decay"], "seed": st["seed"], "ema": True,
        "train_seconds": round(float(ck["elapsed"]), 1), "threads": int(ck.get("threads", torch.get_num_threads())),
        "final_loss": curve[-1] if curve else None,
        "loss_curve_per_100_steps": [round(c, 5) for c in curve],
        "dtype": "float16 (load as float32)",
        "sha256": sha256_file(weights),
    }
    atomic_write_json(weights.with_suffix(".json"), card)
    return card
