"""Paired feature distance between two sample sets drawn with the same seeds and labels.

allocate's keep-cache decision (docs/caching.md) compares each schedule's decoded samples with the
float teacher's in the FID network's feature space: MSE of the samples can rank a cache schedule
above the no-cache plan while FID vs fp32 ranks it below (session 8), so the decision uses the
features FID is computed from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class PairedFeatureDistance:
    """distance(candidate, teacher) = mean over samples i of ‖f(candidate_i) − f(teacher_i)‖² / feature dim.

    The teacher's features are computed once and reused while the same teacher tensor (by identity)
    is passed again, so a sweep of candidates costs one feature pass each."""

    def __init__(self, features: Callable[[torch.Tensor], np.ndarray]):
        self.features = features
        self._teacher: torch.Tensor | None = None
        self._teacher_features: np.ndarray | None = None

    def __call__(self, candidate: torch.Tensor, teacher: torch.Tensor) -> float:
        return float(self.per_sample(candidate, teacher).mean())

    def per_sample(self, candidate: torch.Tensor, teacher: torch.Tensor) -> np.ndarray:
        """‖f(candidate_i) − f(teacher_i)‖² / feature dim for every i (paired tests bootstrap these)."""
        if len(candidate) != len(teacher):
            raise ValueError(f"paired distance needs as many samples as the teacher ({len(candidate)} vs {len(teacher)})")
        if teacher is not self._teacher:
            self._teacher, self._teacher_features = teacher, np.asarray(self.features(teacher), dtype=np.float64)
        f = np.asarray(self.features(candidate), dtype=np.float64)
        return ((f - self._teacher_features) ** 2).sum(axis=1) / f.shape[1]


def inception_distance(weights=None) -> PairedFeatureDistance:
    """The paired distance on FID Inception pool3 features (images as bench feeds FID: decoded, in
    [-1, 1], rounded to uint8). Raises InputError when the Inception weights cannot be found."""
    from diffpro_cli.metrics import fid

    net = fid.load_inception(weights)
    return PairedFeatureDistance(lambda images: fid.inception_features(images, net))
