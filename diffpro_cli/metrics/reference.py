"""Inception features of a seeded subset of the FID reference images, for KID (which needs features,
not the mean and covariance the package ships).

Why not shipped: 1,000 reference features in float16, np.savez_compressed, take 3.67 MB (measured on
MNIST pool3 features: 3,668 bytes each), and the package data (< 25 MB in all) had 2.47 MB left. So
they are computed from the shipped MNIST test images with the same Inception network and cached in the
workdir's FID cache (bench/fid-cache), keyed by the image file's sha256, the subset seed and the
Inception variant: once per workdir, ~0.2-0.35 s per image on 2 CPU cores.

Only `builtin:mnist` has its images in the package; a `.npz` reference has statistics only, and KID
is then not measured (said in the report's notes).
"""

from __future__ import annotations

import numpy as np

KID_REFERENCE_SEED = 0
KID_REFERENCE_MIN = 500
KID_REFERENCE_MAX = 1000


def reference_size(n_generated: int) -> int:
    """Reference images for KID at N generated: max(500, min(N, 1000)), so that KID's subsets can take
    min(1000, N) images of both sets; a larger N extends the cached subset (same seeded permutation)."""
    return max(KID_REFERENCE_MIN, min(n_generated, KID_REFERENCE_MAX))


def reference_images(reference: str, n: int, seed: int = KID_REFERENCE_SEED):
    """(uint8 images [n, 1, 32, 32], provenance) of the first n of a seeded permutation of the
    reference set, or (None, reason) when the reference's images are not available."""
    if reference != "builtin:mnist":
        return None, f"KID needs the reference's images; {reference} holds statistics only (KID is measured against builtin:mnist)"
    from diffpro_cli.artifacts import sha256_file
    from diffpro_cli.mnist import (
        PACKAGE_MNIST_DIR,
        _find,
        load_mnist,
        to_model_space,
        to_uint8,
    )

    raw, _ = load_mnist(PACKAGE_MNIST_DIR)   # the files the shipped statistics were made from
    order = np.random.default_rng(seed).permutation(len(raw))[:n]
    images = to_uint8(to_model_space(raw[order], size=32))
    src = _find(PACKAGE_MNIST_DIR, "t10k-images-idx3-ubyte")
    return images, {"source": reference, "source_sha256": sha256_file(src), "subset_seed": seed, "n": int(n)}


def reference_features(reference: str, n: int, inception, cache, seed: int = KID_REFERENCE_SEED,
                       ui=None) -> tuple[np.ndarray | None, dict]:
    """(features [n, 2048] or None, provenance or {"note": why not}); cached in `cache` (a FeatureCache)."""
    from diffpro_cli.metrics.fid import FeatureCache, inception_features

    images, info = reference_images(reference, n, seed)
    if images is None:
        return None, {"note": info}
    key = FeatureCache.key(kid_reference=info["source"], source_sha256=info["source_sha256"], subset_seed=seed)
    feats = cache.get(key, n)
    start = 0 if feats is None else len(feats)
    if start < n:
        from diffpro_cli.console import QUIET_UI

        ui = ui or QUIET_UI
        ui.info(f"bench: Inception features of {n - start} reference images for KID (once per workdir)")
        with ui.progress("inception reference (KID)", total=n - start) as advance:
            new = inception_features(images[start:], inception, advance=advance)
        feats = new if feats is None else np.concatenate([feats, new])
        cache.put(key, feats, meta={"kid_reference": info["source"], "subset_seed": str(seed)})
    return feats[:n], info
