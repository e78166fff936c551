"""Same-seed closeness of two sample sets: PSNR and SSIM between image i of one row and image i of the
fp32 row (same seed, same label), on images in [0, 1] (uint8 / 255, as saved and as FID reads them).

SSIM is Wang et al. (2004): an 11 x 11 Gaussian window (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03,
data range 1, local statistics over the window's 'valid' positions (no padding; torchmetrics' and the
reference MATLAB code's choice), mean over positions and channels per image.

PSNR per image is 10 log10(1 / MSE). Identical images (MSE 0, common on MNIST's black backgrounds
after uint8 rounding) would give infinity; their MSE is floored at one pixel one uint8 level off,
(1/255)^2 / pixels, so means stay finite (78.3 dB for a 32 x 32 grayscale image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PAIRED_N = 200          # images per row kept for the paired metrics (the first min(N, PAIRED_N) seeds)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(images) -> torch.Tensor:
    """uint8 [N, C, H, W] → float64 in [0, 1]; float input is taken as model space [-1, 1] and
    rounded to uint8 first (what a saved PNG holds)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        from diffpro_cli.mnist import to_uint8

        x = to_uint8(x.float())
    return x.double() / 255.0


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR (dB, data range 1) between [N, C, H, W] image sets (uint8 or model space)."""
    x, y = to_unit(a), to_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"paired images differ in shape ({tuple(x.shape)} vs {tuple(y.shape)})")
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    floor = (1 / 255) ** 2 / x[0].numel()
    return (10 * torch.log10(1.0 / mse.clamp(min=floor))).numpy()


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Per-image SSIM between [N, C, H, W] image sets (uint8 or model space); images need H, W >= window."""
    x, y = to_unit(a), to_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"paired images differ in shape ({tuple(x.shape)} vs {tuple(y.shape)})")
    _, c, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels (got {h} x {w})")
    kernel = _gaussian_window(window, sigma)[None, None].expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx ** 2
    vy = blur(y * y) - my ** 2
    cxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return smap.flatten(1).mean(dim=1).numpy()


def mean_with_interval(values, indices) -> tuple[float, list[float]]:
    """Mean of per-image values and its 95 % bootstrap interval over `indices` ([B, n] into values;
    None: the mean alone, its interval None)."""
    from diffpro_cli.metrics.stats import interval

    v = np.asarray(values, dtype=np.float64)
    if indices is None:
        return float(v.mean()), None
    reps = v[np.asarray(indices)].mean(axis=1)
    return float(v.mean()), interval(reps, float(v.mean()))


# ---------------------------------------------------------------------------------------------
# the paired images of a bench row, cached beside its Inception features
# ---------------------------------------------------------------------------------------------


def paired_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"paired-{key}.safetensors"


def load_paired(cache_dir: Path, key: str, n: int) -> torch.Tensor | None:
    """The first n stored uint8 images under `key`, or None when fewer are stored (or none, or damaged)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = paired_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        images = load_file(str(path))["images"]
    except (OSError, KeyError, SafetensorError):
        return None
    return images[:n] if images.dtype == torch.uint8 and images.ndim == 4 and len(images) >= n else None


def save_paired(cache_dir: Path, key: str, images) -> None:
    from diffpro_cli.artifacts import atomic_save_safetensors

    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        from diffpro_cli.mnist import to_uint8

        x = to_uint8(x.float())
    atomic_save_safetensors(paired_path(cache_dir, key), {"images": x}, {"n": str(len(x))})
