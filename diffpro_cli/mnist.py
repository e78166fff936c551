"""MNIST in IDX format (optionally gzipped), padded to 32x32 and scaled to [-1, 1]."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from diffpro_cli.errors import InputError

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; pass --data DIR with MNIST IDX files (t10k-images-idx3-ubyte[.gz])")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc}); re-download the MNIST IDX file") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise InputError(f"{path}: not an IDX file with magic {magic} (found {found}); pass the MNIST images/labels files")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


PACKAGE_MNIST_DIR = Path(__file__).resolve().parent / "data" / "mnist"  # the t10k files ship with the package (CC BY-SA 3.0, see its README.md)


def default_mnist_dir() -> Path:
    """$DIFFPRO_MNIST, else the MNIST test set shipped inside the package (diffpro_cli/data/mnist)."""
    env = os.environ.get("DIFFPRO_MNIST")
    if env:
        return Path(env)
    return PACKAGE_MNIST_DIR


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise InputError(f"{directory}: no {stem}[.gz]; pass --data DIR holding the MNIST IDX files")


def load_mnist(directory: str | Path | None = None, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N]."""
    directory = Path(directory) if directory else default_mnist_dir()
    images = read_idx(_find(directory, f"{split}-images-idx3-ubyte"), IMAGE_MAGIC)
    labels = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"), LABEL_MAGIC)
    if len(images) != len(labels):
        raise InputError(f"{directory}: {len(images)} images but {len(labels)} labels; use matching MNIST files")
    return images, labels


def to_model_space(images_u8: np.ndarray, size: int = 32) -> torch.Tensor:
    """[N, 28, 28] uint8 → [N, 1, size, size] float in [-1, 1], zero (black = -1) padded."""
    x = torch.from_numpy(images_u8.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad > 0:
        lo = pad // 2
        x = torch.nn.functional.pad(x, (lo, pad - lo, lo, pad - lo), value=-1.0)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] → uint8 [0, 255] (same shape)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
