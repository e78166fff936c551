from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.commands.common import JsonOut, Quiet, Seed, make_ui
from diffpro_cli.errors import UsageError


def train_cmd(
    name: Annotated[str, typer.Argument(help="Built-in model to train: dit-mnist, unet-mnist or flow-mnist (rectified flow, text prompts).")] = "dit-mnist",
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint directory (default .train/NAME).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Directory with MNIST IDX files (default $DIFFPRO_MNIST).")] = None,
    steps: Annotated[int, typer.Option("--steps")] = 2400,
    batch: Annotated[int, typer.Option("--batch")] = 128,
    lr: Annotated[float, typer.Option("--lr")] = 5e-4,
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop (and export) after this much training time.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
    loss_weighting: Annotated[str, typer.Option("--loss-weighting", help="uniform (plain epsilon MSE) or min-snr (Min-SNR-gamma).")] = "uniform",
    snr_gamma: Annotated[float, typer.Option("--snr-gamma", help="gamma of --loss-weighting min-snr.")] = 5.0,
    install: Annotated[bool, typer.Option("--install", help="Copy the exported weights into the package.")] = False,
    seed: Seed = 0,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Train (or resume training) a built-in MNIST model and export fp16 weights with a model card."""
    import math

    from diffpro_cli.models.builtin import BUILTIN_CONFIGS, WEIGHTS_DIR
    from diffpro_cli.train import LOSS_WEIGHTINGS, train

    ui = make_ui(quiet, json_output)
    if name not in BUILTIN_CONFIGS:
        raise UsageError(f"{name}: unknown built-in model; choose one of {', '.join(BUILTIN_CONFIGS)}")
    if steps < 1 or batch < 1:
        raise UsageError("--steps and --batch must be at least 1")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise UsageError(f"--loss-weighting {loss_weighting}: unknown; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not snr_gamma > 0:   # NaN passed `<= 0` and turned every loss weight (and then the model) into NaN
        raise UsageError(f"--snr-gamma {snr_gamma:g}: must be positive")
    if not 0 < lr < math.inf:
        raise UsageError(f"--lr {lr:g}: must be a positive finite number (an infinite rate exports NaN weights)")
    if (max_minutes is not None and not max_minutes > 0) or (threads is not None and threads < 1):
        raise UsageError("--max-minutes must be positive and --threads at least 1")
    if name == "flow-mnist" and loss_weighting != "uniform":
        raise UsageError("--loss-weighting is for the epsilon models; flow-mnist trains on the plain velocity MSE (drop the option)")
    out = out or Path(".train") / name
    if install:   # before training, not after it
        from diffpro_cli.artifacts import writable_dir

        try:
            writable_dir(WEIGHTS_DIR)
        except UsageError:
            raise UsageError(f"--install: cannot write the package's weights folder {WEIGHTS_DIR}; train without "
                             "--install and load the exported files from --out") from None
    try:
        if name == "flow-mnist":   # its own objective and prompts: train_flow (epsilon-only options do not apply)
            from diffpro_cli.train_flow import train_flow

            card = train_flow(out, data_dir=data, steps=steps, batch=batch, lr=lr, seed=seed, max_minutes=max_minutes,
                              threads=threads, log=ui.info)
        else:
            card = train(name, out, data_dir=data, steps=steps, batch=batch, lr=lr, seed=seed,
                         max_minutes=max_minutes, threads=threads, loss_weighting=loss_weighting,
                         snr_gamma=snr_gamma, log=ui.info)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if install:   # atomic copies: an interrupted or refused install leaves the package's old files whole
        from diffpro_cli.artifacts import atomic_write_bytes

        for ext in (".safetensors", ".json"):
            atomic_write_bytes(WEIGHTS_DIR / f"{name}{ext}", (out / f"{name}{ext}").read_bytes())
    ui.result(card, human=f"trained {name}: {card['steps']} steps, final loss {card['final_loss']:.4f} → {out}")
