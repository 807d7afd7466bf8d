"""FID and KID from Inception pool3 features, with reference statistics cached as .npz."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spd_jax.metrics.frechet import frechet_distance, gaussian_statistics
from spd_jax.metrics.inception import InceptionFeatures
from spd_jax.metrics.kid import kernel_inception_distance

#: Reference features kept (a seeded subset) for KID; FID uses the statistics of all images.
KID_REFERENCE_FEATURES = 10_000


class ReferenceStatistics(NamedTuple):
    """Gaussian statistics of a reference set's features (float64) and a feature subset for KID."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    num_images: int


def array_fingerprint(images: np.ndarray) -> str:
    """Hex SHA-256 of an array's shape, dtype and bytes (identifies a reference set)."""
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{images.shape}{images.dtype}".encode())
    digest.update(images.data)
    return digest.hexdigest()


def compute_reference_statistics(features: np.ndarray, *, seed: int = 0) -> ReferenceStatistics:
    """Statistics of reference features (N, D): mean, covariance, and up to
    :data:`KID_REFERENCE_FEATURES` rows chosen with ``seed``."""
    mu, sigma = gaussian_statistics(features)
    keep = min(len(features), KID_REFERENCE_FEATURES)
    rows = np.sort(np.random.default_rng(seed).choice(len(features), keep, replace=False))
    return ReferenceStatistics(mu, sigma, np.asarray(features[rows], np.float32), len(features))


def reference_statistics(images: np.ndarray, extractor: InceptionFeatures,
                         cache_path: str | os.PathLike | None = None) -> ReferenceStatistics:
    """Inception statistics of ``images`` (N, H, W, C) in model units, loaded from ``cache_path``
    when it holds statistics made by the same extractor, else computed and written there."""
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.exists():
        with np.load(path) as data:
            if str(data["extractor"]) == extractor.identity:
                return ReferenceStatistics(data["mu"], data["sigma"], data["features"], int(data["num_images"]))
    stats = compute_reference_statistics(extractor(images))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, features=stats.features, num_images=stats.num_images,
                 extractor=np.array(extractor.identity))
        os.replace(tmp, path)
    return stats


def inception_metrics(features: np.ndarray, reference: ReferenceStatistics, *, fid: bool = True,
                      kid: bool = False, seed: int = 0) -> dict[str, float]:
    """{"fid"} and/or {"kid", "kid_std"} of sample features (N, 2048) against reference statistics."""
    out = {}
    if fid:
        out["fid"] = frechet_distance(*gaussian_statistics(features), reference.mu, reference.sigma)
    if kid:
        out["kid"], out["kid_std"] = kernel_inception_distance(features, reference.features, seed=seed)
    return out
