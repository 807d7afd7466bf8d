"""Power spectra of image data sets, in model units ([-1, 1]) and on a basis's frequency grid.

The spectrum S_c(k) = mean over images of |B x_c(k)|^2 (docs/math.md §2.5b) is the variance of the
Gaussian surrogate that SPD's geodesic starts from. It keeps the mean (the process acts on raw
images), is computed in float64 and is floored at ``FLOOR``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spd_jax.diffusion import bases

FLOOR = 1e-8


class PowerLaw(NamedTuple):
    """S(k) = c1 / (c2 + |k|)^m."""

    c1: float
    c2: float
    m: float


#: The official SPD CIFAR-10 preset (``configs/cifar10_fourier.yml``).
CIFAR10_PRESET = PowerLaw(1.59, 0.0086, 2.0)


def estimate(images, basis: str = "dft", per_channel: bool = True, batch_size: int = 256) -> np.ndarray:
    """Mean |B x|^2 over ``images`` (N, H, W, C) in model units; returns (H, W, C) float64.

    ``per_channel=False`` averages over channels (the result still has C channels, all equal).
    """
    bases.check_basis(basis)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, H, W, C) with N >= 1; got {images.shape}")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"images hold {int(np.size(images) - np.isfinite(images).sum())} non-finite values; "
                         "a spectrum estimate needs finite images in model units [-1, 1]")
    lo, hi = float(np.min(images)), float(np.max(images))
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"images must be in model units [-1, 1] for a spectrum estimate; got range [{lo:.4g}, {hi:.4g}]"
        )
    total = np.zeros(images.shape[1:], np.float64)
    for start in range(0, images.shape[0], batch_size):
        u = bases.to_spectral_np(images[start : start + batch_size], basis)
        total += np.sum(np.abs(u) ** 2, axis=0)
    spec = total / images.shape[0]
    if not per_channel:
        spec = np.broadcast_to(spec.mean(axis=-1, keepdims=True), spec.shape).copy()
    return np.maximum(spec, FLOOR)


def power_law(shape, c1: float = CIFAR10_PRESET.c1, c2: float = CIFAR10_PRESET.c2,
              m: float = CIFAR10_PRESET.m, basis: str = "dft") -> np.ndarray:
    """c1 / (c2 + |k|)^m on the (H, W) grid of ``basis``, repeated over C channels: (H, W, C)."""
    h, w, c = (int(s) for s in shape)
    if min(h, w, c) < 1:
        raise ValueError(f"shape must be (H, W, C) with positive sizes; got {tuple(shape)}")
    if not (c1 > 0 and c2 > 0):
        raise ValueError(f"power_law needs c1 > 0 and c2 > 0 (c2 keeps S(0) finite); got c1={c1}, c2={c2}")
    mag = bases.frequency_magnitude(h, w, basis)
    return np.repeat((c1 / (c2 + mag) ** m)[:, :, None], c, axis=2)


def radial_profile(spectrum, basis: str = "dft") -> tuple[np.ndarray, np.ndarray]:
    """Channel- and ring-averaged spectrum: (ring radii round(|k|), mean S on each ring)."""
    s = np.asarray(spectrum, np.float64)
    mag = bases.frequency_magnitude(s.shape[0], s.shape[1], basis)
    rings = np.round(mag).astype(int)
    mean_s = s.mean(axis=-1)
    radii = np.unique(rings)
    return radii.astype(np.float64), np.array([mean_s[rings == r].mean() for r in radii])


def fit_power_law(spectrum, basis: str = "dft") -> PowerLaw:
    """Least-squares fit of log S = log c1 - m log(c2 + |k|) over all non-DC frequencies.

    The channel-averaged spectrum is used; DC is excluded (its value is the squared image mean,
    not part of the power law); c2 is found by a log-spaced search with (c1, m) solved in closed
    form for each candidate.
    """
    s = np.asarray(spectrum, np.float64).mean(axis=-1)
    mag = bases.frequency_magnitude(s.shape[0], s.shape[1], basis)
    keep = mag > 0
    radii, log_s = mag[keep], np.log(s[keep])
    if np.unique(radii).size < 2:
        raise ValueError("fit_power_law needs at least two distinct non-DC frequencies")
    best = None
    for c2 in np.geomspace(1e-4, 10.0, 600):
        design = np.stack([np.ones_like(radii), -np.log(c2 + radii)], axis=1)
        coef, *_ = np.linalg.lstsq(design, log_s, rcond=None)
        err = np.sum((design @ coef - log_s) ** 2)
        if best is None or err < best[0]:
            best = (err, PowerLaw(float(np.exp(coef[0])), float(c2), float(coef[1])))
    return best[1]
