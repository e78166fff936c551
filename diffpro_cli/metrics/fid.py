"""FID exactly as pytorch-fid computes it, with Inception weights that work offline.

The pipeline is pytorch-fid's: uint8 pixels / 255, bilinear resize to 299 x 299 (align_corners=False,
no antialias), scale to [-1, 1], pool3 features (2048-d), mean and covariance in float64, and the same
Frechet distance formula. The network and where its weights come from: metrics/inception.py.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.metrics.inception import load_inception

FEATURES_ID = "pytorch-fid-0.3/pt_inception-2015-12-05/pool3/bilinear299"  # part of every feature-cache key
BUILTIN_STATS = {"builtin:mnist": "mnist32_fid_stats.npz"}
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's list


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def _as_uint8(images) -> torch.Tensor:
    """uint8 [N, C, H, W] or float in [-1, 1] (model space, rounded to uint8 like a saved PNG)."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UsageError(f"images must be [N, 1 or 3, H, W]; got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise UsageError(f"images must be uint8 or float in [-1, 1]; got {x.dtype}")
    from diffpro_cli.mnist import to_uint8

    return to_uint8(x.float())


def inception_features(images, model: nn.Module | None = None, batch_size: int = 50,
                       advance: Callable[[int], None] | None = None) -> np.ndarray:
    """pool3 features [N, 2048] (float64, like pytorch-fid) of uint8 images or float images in [-1, 1].

    Grayscale is replicated to 3 channels; pixels go in as uint8 / 255 (pytorch-fid's ToTensor).
    `advance(k)` is called after each batch of k images.
    """
    if batch_size < 1:
        raise UsageError("--batch must be at least 1")
    x8 = _as_uint8(images)
    model = model if model is not None else load_inception()
    device = next(model.parameters()).device
    out = np.empty((len(x8), 2048), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(x8), batch_size):
            batch = x8[start:start + batch_size].to(device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            feats = model(batch.float().div(255))
            out[start:start + len(batch)] = feats.cpu().numpy()
            if advance is not None:
                advance(len(batch))
    return out


class FeatureCache:
    """Inception features on disk, one safetensors file per content key, row i = sample index i.

    Key a set by what determines its images, e.g.
    `FeatureCache.key(model_sha256=..., sampler=cfg.as_dict(), timesteps=ts, seed=0)`; the Inception
    variant is part of every key. A longer set extends a shorter one with the same key.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(**parts) -> str:
        from diffpro_cli.artifacts import sha256_json

        return sha256_json({"features": FEATURES_ID, **parts})[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key}.safetensors"

    def get(self, key: str, n: int | None = None) -> np.ndarray | None:
        """The first min(n, stored) rows (float64), or None when nothing usable is stored."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.exists():
            return None
        try:
            feats = load_file(str(path))["features"]
        except (OSError, KeyError, SafetensorError):
            return None  # a damaged cache entry is recomputed, not fatal
        if feats.ndim != 2 or feats.shape[1] != 2048:
            return None
        return feats[:n].double().numpy()

    def put(self, key: str, features: np.ndarray, meta: dict[str, str] | None = None) -> None:
        """Store (atomically) unless at least as many rows are already stored."""
        from diffpro_cli.artifacts import atomic_save_safetensors

        stored = self.get(key)
        if stored is not None and len(stored) >= len(features):
            return
        metadata = {"features": FEATURES_ID, "n": str(len(features)), **{k: str(v) for k, v in (meta or {}).items()}}
        atomic_save_safetensors(self.path(key), {"features": torch.from_numpy(np.asarray(features, dtype=np.float32))}, metadata)


def fid_features(images, model: nn.Module | None = None, batch_size: int = 50,
                 advance: Callable[[int], None] | None = None,
                 cache: FeatureCache | str | Path | None = None, key: str | None = None) -> np.ndarray:
    """`inception_features` with an optional on-disk cache: rows already stored under `key` are reused."""
    if cache is None or key is None:
        return inception_features(images, model, batch_size, advance)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    n = len(images)
    done = cache.get(key, n)
    start = 0 if done is None else len(done)
    if advance is not None and start:
        advance(start)
    if start >= n:
        return done
    new = inception_features(images[start:], model, batch_size, advance)
    feats = new if done is None else np.concatenate([done, new])
    cache.put(key, feats)
    return feats


# ---------------------------------------------------------------------------------------------
# Statistics and the Frechet distance
# ---------------------------------------------------------------------------------------------


def stats_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as pytorch-fid: mean over images and the (N-1)-normalised covariance, float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise InputError(f"FID needs at least 2 images (got {len(features)}); generate more samples")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


class _LinalgWithDisp:
    """scipy.linalg whose sqrtm still takes `disp` (see pytorch_fid_scipy); everything else is scipy's."""

    def __getattr__(self, name):
        from scipy import linalg

        return getattr(linalg, name)

    @staticmethod
    def sqrtm(A, disp=True, **kwargs):
        from scipy import linalg

        root = linalg.sqrtm(A, **kwargs)
        if disp:
            return root
        # the old disp=False contract: (root, Frobenius error of root² relative to A)
        errest = np.linalg.norm(root @ root - A, "fro") / max(np.linalg.norm(A, "fro"), np.finfo(float).tiny)
        return root, float(errest)


@contextlib.contextmanager
def pytorch_fid_scipy():
    """pytorch-fid 0.3.0 calls scipy.linalg.sqrtm(A, disp=False); scipy 1.18 (Python >= 3.12) removed `disp`,
    so its Fréchet distance raised TypeError there. For the call, hand pytorch-fid a scipy.linalg whose
    sqrtm keeps the old signature; with an older scipy nothing changes."""
    import inspect

    from pytorch_fid import fid_score
    from scipy import linalg

    try:
        has_disp = "disp" in inspect.signature(linalg.sqrtm).parameters
    except (TypeError, ValueError):   # a signature inspect cannot read: assume the old one
        has_disp = True
    if has_disp or fid_score.linalg is not linalg:
        yield
        return
    fid_score.linalg = _LinalgWithDisp()
    try:
        yield
    finally:
        fid_score.linalg = linalg


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)).

    method="sqrtm" is pytorch-fid's `calculate_frechet_distance` itself (scipy's sqrtm of S1 S2, with its
    safeguards); method="eigh" gets the same trace from the eigenvalues of a symmetric matrix similar to
    S1 S2 (see _trace_sqrt_product_eigh).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"FID statistics differ in size ({mu1.shape[0]} vs {mu2.shape[0]} features); use 2048-d pool3 statistics for both")
    if method == "eigh":
        diff = mu1 - mu2
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product_eigh(sigma1, sigma2))
    if method != "sqrtm":
        raise UsageError(f"FID method {method!r}: use sqrtm (pytorch-fid's) or eigh (fast)")
    from pytorch_fid.fid_score import calculate_frechet_distance

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), pytorch_fid_scipy():  # its singular-product notice would corrupt --json output
            value = calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    except ValueError as exc:  # "Imaginary component m"
        raise InputError(f"FID: matrix square root has an imaginary part ({exc}); use more images") from None
    if said.getvalue().strip():
        warnings.warn(f"FID (pytorch-fid): {said.getvalue().strip()}")
    return float(value)


# Kept beside pytorch-fid's sqrtm: on 2048-d MNIST stats, 1.4-17 s vs 40-70 s (2 busy cores), 9e-8 vs 3e-7 relative error (SVD truth).
def _trace_sqrt_product_eigh(sigma1, sigma2) -> float:
    """Tr sqrt(S1 S2) for symmetric PSD S1, S2 as the sum of sqrt of the eigenvalues of a PSD matrix
    similar to S1 S2: L^T S1 L with S2 = L L^T (Cholesky; S1's factor when S2 is singular), else
    sqrt(S1) S2 sqrt(S1)."""
    for a, b in ((sigma2, sigma1), (sigma1, sigma2)):
        try:
            low = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        m = low.T @ b @ low
        break
    else:  # both singular (fewer images than features): symmetric square root of S1
        w, u = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        root1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
        m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def pack_sigma(sigma: np.ndarray) -> np.ndarray:
    """Upper triangle of a covariance as float32: the shipped statistics are 4x smaller this way
    (31 MB -> 8 MB); the largest entry error is 3e-8 against entries up to 0.84, far below FID's noise."""
    return sigma[np.triu_indices(sigma.shape[0])].astype(np.float32)


def unpack_sigma(triu: np.ndarray) -> np.ndarray:
    d = int((np.sqrt(8 * triu.size + 1) - 1) / 2)
    if d * (d + 1) // 2 != triu.size:
        raise ValueError(f"sigma_triu has {triu.size} entries, not a triangle")
    sigma = np.zeros((d, d), dtype=np.float64)
    sigma[np.triu_indices(d)] = triu
    return sigma + sigma.T - np.diag(np.diag(sigma))


def load_reference_stats(name_or_path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) from 'builtin:mnist' or a pytorch-fid .npz (n is None if the file does not say)."""
    name = str(name_or_path)
    if name.startswith("builtin:"):
        if name not in BUILTIN_STATS:
            raise UsageError(f"{name}: unknown reference; use one of {', '.join(BUILTIN_STATS)} or an .npz path")
        from importlib.resources import files

        path = Path(str(files("diffpro_cli") / "data" / BUILTIN_STATS[name]))
        if not path.exists():
            raise InputError(f"{name}: its statistics are missing from this install ({path}); reinstall diffpro")
    else:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"{path}: no such file; pass builtin:mnist or an .npz made by `diffpro fid-stats`")
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):   # a .npy holds one array, not mu and sigma
            raise ValueError("a single array, not an .npz archive")
        with loaded as f:
            mu = f["mu"][:]
            sigma = f["sigma"][:] if "sigma" in f.files else unpack_sigma(f["sigma_triu"])
            n = int(f["n"]) if "n" in f.files else None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("mu or sigma holds NaN or infinity")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not FID statistics with mu and sigma ({exc}); re-create it with `diffpro fid-stats`") from None
    return mu, sigma, n


def fid(images, reference: str | Path = "builtin:mnist", model: nn.Module | None = None, batch_size: int = 50,
        advance: Callable[[int], None] | None = None, cache: FeatureCache | str | Path | None = None,
        key: str | None = None, method: str = "sqrtm") -> dict:
    """FID of `images` against reference statistics: {"fid", "n", "reference", "reference_n", "method"}."""
    mu_ref, sigma_ref, n_ref = load_reference_stats(reference)
    feats = fid_features(images, model, batch_size, advance, cache, key)
    mu, sigma = stats_from_features(feats)
    return {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method), "n": len(feats),
            "reference": str(reference), "reference_n": n_ref, "method": method}


# ---------------------------------------------------------------------------------------------
# Image folders (pytorch-fid reads them the same way: PIL, converted to RGB)
# ---------------------------------------------------------------------------------------------


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory; pass a folder of images or builtin:mnist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass a folder of images")
    return files


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")   # PIL's convert('RGB') clips these to 0..255


@contextlib.contextmanager
def _opened_image(path: Path):
    """PIL's Image.open with its failures as one InputError naming the file (a decompression bomb is not
    an OSError: over PIL's 2 x MAX_IMAGE_PIXELS)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            yield im
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: cannot read image ({exc}); remove or re-save it") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: cannot read image ({exc}); downscale it or remove it") from None


def check_images(files: list[Path]) -> list[Path]:
    """Open every file's header (no decoding, ~0.02 ms each) so a non-image or an oversized one fails
    before the Inception pass over the folder, not an hour into it (a truncated body still fails later,
    when read_image decodes it). Returns the files with more than 8 bits per sample (16-bit PNG, float
    TIFF): convert('RGB') clips them, as pytorch-fid does, so most of their pixels read as white."""
    wide = []
    for path in files:
        with _opened_image(path) as im:
            if im.mode in WIDE_MODES:
                wide.append(path)
    return wide


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] via PIL's convert('RGB'), as pytorch-fid reads images."""
    with _opened_image(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def folder_features(files: list[Path], model: nn.Module | None = None, batch_size: int = 50,
                    advance: Callable[[int], None] | None = None) -> np.ndarray:
    """Features of image files, read batch by batch (images of different sizes go through one at a time)."""
    parts = []
    for start in range(0, len(files), batch_size):
        images = [read_image(p) for p in files[start:start + batch_size]]
        if len({tuple(im.shape) for im in images}) == 1:
            parts.append(inception_features(torch.stack(images), model, batch_size, advance))
        else:
            parts.extend(inception_features(im[None], model, 1, advance) for im in images)
    return np.concatenate(parts)
