"""The training loop both built-in trainers share (train.py: epsilon models, train_flow.py: flow-mnist).

One `Trainer` owns what they have in common: AdamW, the seeded torch generator that draws each batch,
resume from and atomic save to ckpt.pt, the time budget, gradient clipping, the EMA update, the loss log
and the periodic checkpoint. A trainer supplies only what differs: its `batch_loss` (noise, conditioning
and objective), its learning-rate schedule and the extra state its checkpoint carries.

The order of the random draws is part of the contract: each step draws the batch indices from the
generator first, then `batch_loss` draws the rest, so an interrupted-and-resumed run matches an
uninterrupted one exactly.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor`·base at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_training_images(data_dir: Path | None, out_dir: Path, threads: int | None):
    """MNIST in model space plus its labels; out_dir is created only after the data loaded (bad --data leaves nothing)."""
    from diffpro_cli.artifacts import ensure_dir
    from diffpro_cli.mnist import load_mnist, to_model_space

    if threads:
        torch.set_num_threads(threads)
    images, labels = load_mnist(data_dir)
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) <= 9):
        from diffpro_cli.errors import InputError

        bad = int(labels.max()) if int(labels.max()) > 9 else int(labels.min())
        raise InputError(f"{data_dir or 'the MNIST files'}: a label {bad} outside the digits 0-9 (the conditioning has "
                         "10 classes); use the MNIST label file")
    ensure_dir(out_dir)   # a file at --out: one error line, not FileExistsError
    return to_model_space(images), labels


class Trainer:
    """AdamW + EMA training of `model`, checkpointed to `ckpt_path` (the model's state under `model_key`)."""

    def __init__(self, model: torch.nn.Module, ema: torch.nn.Module, *, lr: float, seed: int, ckpt_path: Path,
                 model_key: str, log=print):
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        self.model, self.ema, self.ckpt_path, self.model_key, self.log = model, ema, ckpt_path, model_key, log
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.losses, self.elapsed_before = 0, [], 0.0
        self.name: str | None = None

    def resume(self, name: str, check: Callable[[dict], None] | None = None) -> dict | None:
        """Restore from ckpt_path if it exists and return the checkpoint (None for a fresh run).
        `check` sees the checkpoint first and may refuse it (ValueError) before anything is restored.
        An unreadable checkpoint, or one of another model, is an InputError (one line, exit 3)."""
        from diffpro_cli.errors import InputError

        self.name = name
        if not self.ckpt_path.exists():
            return None
        fix = "delete it or choose another --out"
        try:
            ck = torch.load(self.ckpt_path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:  # garbage, truncated zip
            raise InputError(f"{self.ckpt_path}: not a readable training checkpoint ({type(exc).__name__}; truncated "
                             f"or not a checkpoint); {fix}") from None
        other = ck.get("built_in") if isinstance(ck, dict) else None
        if other is not None and other != name:
            raise InputError(f"{self.ckpt_path}: a training checkpoint of {other}, not {name}; {fix}")
        if not isinstance(ck, dict) or not isinstance(ck.get(self.model_key), dict) or \
                set(ck[self.model_key]) != set(self.model.state_dict()):
            raise InputError(f"{self.ckpt_path}: not a training checkpoint of {name} (its weights do not fit); {fix}")
        if check is not None:
            check(ck)
        try:
            self.model.load_state_dict(ck[self.model_key])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["opt"])
            self.gen.set_state(ck["gen"])
            self.step, self.losses, self.elapsed_before = int(ck["step"]), list(ck["losses"]), float(ck["elapsed"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(f"{self.ckpt_path}: a damaged training checkpoint of {name} "
                             f"({str(exc).splitlines()[0][:120]}); {fix}") from None
        self.log(f"resumed {name} at step {self.step}")
        return ck

    def _elapsed(self) -> float:
        return self.elapsed_before + time.time() - self._t0

    def _save(self, extra_state: Callable[[], dict]) -> None:
        from diffpro_cli.artifacts import atomic_torch_save

        atomic_torch_save({
            self.model_key: self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(), "step": self.step, "losses": self.losses, "elapsed": self._elapsed(),
            "built_in": self.name, **extra_state(),
        }, self.ckpt_path)

    def run(self, x_all: torch.Tensor, *, steps: int, batch: int, ema_decay: float, lr_at: Callable[[int], float],
            batch_loss: Callable, extra_state: Callable[[], dict] = dict, max_minutes: float | None = None,
            checkpoint_every: int = 100) -> None:
        """Train until `steps` or `max_minutes` of (accumulated) training time, then save.

        `batch_loss(model, x0, idx)` returns (loss to minimise, per-step value to record in `losses`);
        `extra_state()` returns the trainer's own checkpoint entries.
        """
        model, ema, opt = self.model, self.ema, self.opt
        self._t0 = time.time()
        model.train()
        n = x_all.shape[0]
        running = None
        while self.step < steps:
            if max_minutes is not None and self._elapsed() / 60 > max_minutes:
                if self.step == 0:   # nothing trained: exporting the random init would pass for a model
                    from diffpro_cli.errors import BudgetError

                    raise BudgetError(f"--max-minutes {max_minutes:g} ran out before the first training step; "
                                      "give it more time")
                self.log(f"time budget reached at step {self.step}")
                break
            idx = torch.randint(0, n, (batch,), generator=self.gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(self.step)
            loss, recorded = batch_loss(model, x_all[idx], idx)
            if not torch.isfinite(loss):
                self._diverged(f"the loss is {loss.item()} at step {self.step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = min(ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pn, 1 - decay)
            self.step += 1
            self.losses.append(recorded.item())
            running = self.losses[-1] if running is None else 0.98 * running + 0.02 * self.losses[-1]
            if self.step % 20 == 0:
                rate = self.step * batch / max(1e-6, self._elapsed())
                self.log(f"step {self.step}/{steps} loss {running:.4f} lr {lr_at(self.step):.2e} ~{rate:.0f} img/s(avg)")
            if self.step % checkpoint_every == 0:
                self._check_finite()
                self._save(extra_state)
        self._check_finite()
        self._save(extra_state)

    def _check_finite(self) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in (*self.model.parameters(), *self.ema.parameters())):
            self._diverged(f"the weights hold NaN or infinity at step {self.step}")

    def _diverged(self, what: str) -> None:
        """Stop without saving: the last checkpoint (finite, if any) stays, and nothing NaN is exported."""
        from diffpro_cli.errors import UsageError

        kept = f"{self.ckpt_path} keeps the last good step" if self.ckpt_path.exists() else "nothing was saved"
        raise UsageError(f"training diverged: {what}; lower --lr ({kept})")


def save_fp16_weights(state: dict, weights: Path, name: str) -> dict:
    """Write `state` as fp16 safetensors atomically (tagged builtin:NAME); returns the fp16 state."""
    from diffpro_cli.artifacts import atomic_save_safetensors

    state = {k: v.half().contiguous() for k, v in state.items()}
    wide = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if wide:   # beyond float16's ±65504 (or NaN): the export would load as inf
        from diffpro_cli.errors import UsageError

        raise UsageError(f"{name}: {len(wide)} weight tensors ({wide[0]}, ...) do not fit float16; lower --lr and train again")
    atomic_save_safetensors(weights, state, metadata={"diffpro": f"builtin:{name}"})
    return state


def write_model_card(weights: Path, card: dict, losses: list, window: int = 100) -> dict:
    """Complete `card` with the loss curve (mean recorded loss per `window` steps), dtype and the weights'
    sha256, and write it atomically next to the weights as .json."""
    from diffpro_cli.artifacts import atomic_write_json, sha256_file

    curve = [float(np.mean(losses[i:i + window])) for i in range(0, len(losses), window)]
    card = {**card,
            "final_loss": curve[-1] if curve else None,
            "loss_curve_per_100_steps": [round(c, 5) for c in curve],
            "dtype": "float16 (load as float32)",
            "sha256": sha256_file(weights)}
    atomic_write_json(weights.with_suffix(".json"), card)
    return card
