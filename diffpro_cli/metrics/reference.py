"""Inception features of a seeded subset of the FID reference images, for KID (which needs features,
not the mean and covariance the package ships).

The first 500 of the subset (KID_REFERENCE_MIN, what bench needs up to N = 500) ship with the package
in float16 (`data/mnist32_kid_features.npz`, 1.8 MB, with the feature definition, the image file's
sha256 and the subset seed it was made from): computing them took ~1 minute of every fresh demo.
Float16 moves a feature by at most 2e-3 (values up to ~6). Beyond 500 (N > 500), the rest of the
subset is computed from the shipped MNIST test images with the same Inception network and cached in
the workdir's FID cache (bench/fid-cache), keyed by the image file's sha256, the subset seed and the
Inception variant, ~0.1-0.35 s per image on 2 CPU cores.

Only `builtin:mnist` has its images in the package; a `.npz` reference has statistics only, and KID
is then not measured (said in the report's notes).
"""

from __future__ import annotations

import numpy as np

KID_REFERENCE_SEED = 0
KID_REFERENCE_MIN = 500
KID_REFERENCE_MAX = 1000
SHIPPED_FEATURES = "mnist32_kid_features.npz"


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
    if feats is None or len(feats) < n:
        shipped = shipped_features(info)
        if shipped is not None and (feats is None or len(shipped) > len(feats)):
            feats = shipped[:n]
            cache.put(key, feats, meta={"kid_reference": info["source"], "subset_seed": str(seed), "from": "package"})
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


def shipped_features(info: dict) -> np.ndarray | None:
    """The package's reference features (float32) when they were made from these images, this subset
    seed and this feature definition; None otherwise (then they are computed)."""
    import json
    from pathlib import Path

    from diffpro_cli.metrics.fid import FEATURES_ID

    path = Path(__file__).resolve().parents[1] / "data" / SHIPPED_FEATURES
    if info.get("source") != "builtin:mnist" or not path.is_file():
        return None
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if (meta.get("features"), meta.get("source_sha256"), meta.get("subset_seed")) != \
                (FEATURES_ID, info.get("source_sha256"), info.get("subset_seed")):
            return None
        return z["features"].astype(np.float32)
