"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula), in float64.

    FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)

tr sqrt(S1 S2) equals tr sqrt(S1^{1/2} S2 S1^{1/2}) (same eigenvalues), and since
S1^{1/2} S2 S1^{1/2} = M M^T with M = S1^{1/2} S2^{1/2}, it is the sum of the singular values of M.
The PSD square roots come from symmetric eigendecompositions. No non-symmetric matrix square root
and no complex round-off are involved, and because singular values (unlike square roots of
eigenvalues) carry no sqrt-amplified round-off, rank-deficient covariances (fewer samples than
dimensions) stay accurate: the distance of a set to itself is zero to ~1e-14 relative.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of ``features`` (N, D) with N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D); got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (float64).

    Eigenvalues below zero (round-off) are set to zero; the input is symmetrised first.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = tr sqrt(S1^{1/2} S2 S1^{1/2}) for symmetric PSD S1, S2, computed as the
    sum of the singular values of S1^{1/2} S2^{1/2}."""
    product = sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)
    return float(np.linalg.svd(product, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, S1) and N(mu2, S2), in feature units²."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def feature_frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits (unbiased covariances) of two feature sets
    (N1, D) and (N2, D).

    When both sets have fewer rows than dimensions no D x D matrix is formed: with centred data
    A1, A2, tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((N1 - 1)(N2 - 1)) (nuclear norm of the
    N1 x N2 cross-Gram matrix), which is exact and costs O(N1 N2 (D + min(N1, N2))).
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"features must have shapes (N1 >= 2, D) and (N2 >= 2, D); got {x.shape}, {y.shape}")
    if max(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    c1, c2 = len(x) - 1, len(y) - 1
    diff = x.mean(axis=0) - y.mean(axis=0)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(diff @ diff + np.sum(a * a) / c1 + np.sum(b * b) / c2 - 2.0 * cross)


def pixel_frechet_distance(images1: np.ndarray, images2: np.ndarray) -> float:
    """Fréchet distance in pixel space: images (N, H, W, C) in model units [-1, 1] flattened to
    H*W*C-vectors. Meant for small images (digits: 64-d, patches: 3072-d); value in pixel units²."""
    images1, images2 = np.asarray(images1), np.asarray(images2)
    if images1.shape[1:] != images2.shape[1:]:
        raise ValueError(f"image shapes differ: {images1.shape[1:]} vs {images2.shape[1:]}")
    return feature_frechet_distance(images1.reshape(len(images1), -1), images2.reshape(len(images2), -1))
