"""Train builtin:flow-mnist: rectified-flow (flow-matching) training of a small SD3-style MMDiT with its word encoder.

x_σ = (1 − σ)·x0 + σ·ε, the network predicts the velocity v = ε − x0 at timestep σ·1000 (SD3's
convention); σ is drawn logit-normal (σ = sigmoid(n), n ~ N(0, 1), as in SD3) and then shifted with
the model's `shift`. Prompts come from templates (builtin_text.TEMPLATES) naming each image's digit,
seeded; 10% are dropped to the empty prompt for classifier-free guidance. The word encoder's tables
are trained jointly. AdamW with warm-up and cosine decay, EMA of the weights, seeded, resumable from
out_dir/ckpt.pt, time-boxed (train_loop.Trainer, the loop train.py uses too). The EMA weights
(network + encoder) are exported as fp16 safetensors with a model card.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpro_cli.models import builtin_text
from diffpro_cli.models.builtin import BUILTIN_CONFIGS, build_net
from diffpro_cli.train_loop import (
    Trainer,
    load_training_images,
    save_fp16_weights,
    warmup_cosine_lr,
    write_model_card,
)

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
    shift = float(BUILTIN_CONFIGS[NAME]["flow_shift"])
    x_all, labels = load_training_images(data_dir, out_dir, threads)
    y_all = labels.astype(np.int64)

    ckpt_path = out_dir / "ckpt.pt"
    trainer = Trainer(_Joint(seed), _Joint(seed), lr=lr, seed=seed, ckpt_path=ckpt_path, model_key="model", log=log)
    gen = trainer.gen
    rng = random.Random(seed)                 # prompt templates and drops
    settings = {"steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": seed, "shift": shift}

    def same_settings(ck):
        if ck["settings"] != settings:
            raise ValueError(f"{ckpt_path} was trained with {ck['settings']}; resume with the same settings or use another --out")

    ck = trainer.resume(NAME, check=same_settings)
    if ck is not None:
        rng.setstate(_rng_state(ck["rng"]))

    def batch_loss(model, x0, idx):
        """Velocity MSE at shifted logit-normal σ, prompts from the templates (10% dropped to the empty prompt)."""
        prompts = ["" if rng.random() < PROMPT_DROP else builtin_text.prompt_for(int(y_all[i]), rng) for i in idx.tolist()]
        ids = builtin_text.token_ids(prompts)
        sigma = shifted_sigmas(torch.randn(batch, generator=gen), shift)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        loss = F.mse_loss(model(xt, sigma * 1000, ids), noise - x0)
        return loss, loss

    def extra_state():
        return {"rng": _rng_list(rng.getstate()), "settings": settings, "threads": torch.get_num_threads()}

    trainer.run(x_all, steps=steps, batch=batch, ema_decay=ema_decay, lr_at=lambda step: warmup_cosine_lr(step, steps, lr),
                batch_loss=batch_loss, extra_state=extra_state, max_minutes=max_minutes,
                checkpoint_every=checkpoint_every)
    return export_flow(out_dir, data_dir=data_dir)


def _rng_list(state):
    """random.Random state as nested lists/ints (weights_only checkpoints store no tuples of objects)."""
    return [state[0], list(state[1]), state[2]]


def _rng_state(saved):
    return (int(saved[0]), tuple(int(v) for v in saved[1]), saved[2])


def export_flow(out_dir: Path, data_dir=None) -> dict:
    """Write the EMA weights (network, then the encoder under `text_encoder.`) as fp16 safetensors plus a model card."""
    ck = torch.load(out_dir / "ckpt.pt", weights_only=True)
    weights = out_dir / f"{NAME}.safetensors"
    # the network's keys lose their "net." prefix; text_encoder.* keeps its own
    state = save_fp16_weights({k.removeprefix("net."): v for k, v in ck["ema"].items()}, weights, NAME)
    st = ck["settings"]
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
    }
    return write_model_card(weights, card, ck["losses"])
