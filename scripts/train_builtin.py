"""Reproduce the shipped built-in weights: `python scripts/train_builtin.py dit-mnist --steps 2400`.

Equivalent to `diffpro train`; resumable (re-run the same command after an interruption).
"""

import argparse
import shutil
from pathlib import Path

from diffpro_cli.models.builtin import WEIGHTS_DIR
from diffpro_cli.train import train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=["dit-mnist", "unet-mnist"])
    ap.add_argument("--out", type=Path, default=None, help="checkpoint dir (default .train/NAME)")
    ap.add_argument("--data", type=Path, default=None, help="MNIST IDX dir (default $DIFFPRO_MNIST, else the MNIST test set shipped in diffpro_cli/data/mnist)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--install", action="store_true", help="copy the exported weights into the package")
    a = ap.parse_args()
    out = a.out or Path(".train") / a.name
    card = train(a.name, out, data_dir=a.data, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                 threads=a.threads, max_minutes=a.max_minutes, log=lambda m: print(m, flush=True))
    print(f"exported {out / (a.name + '.safetensors')}: {card['steps']} steps, loss {card['final_loss']}")
    if a.install:
        for ext in (".safetensors", ".json"):
            shutil.copy(out / f"{a.name}{ext}", WEIGHTS_DIR / f"{a.name}{ext}")
        print(f"installed into {WEIGHTS_DIR}")


if __name__ == "__main__":
    main()
