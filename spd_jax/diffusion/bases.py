"""Orthonormal spectral bases acting per channel on (..., H, W, C) arrays.

Three bases are supported:

* ``"dft"``: the unitary 2-D DFT (``fft2`` with ``norm="ortho"``) over the spatial axes (-3, -2).
  The forward transform returns a complex array; ``from_spectral`` returns the real part after the
  round trip (for real schedules that are even in k the imaginary part is round-off).
* ``"dct"``: the orthonormal DCT-II over the spatial axes (real in, real out).
* ``"identity"``: the pixel basis, for frequency-independent processes.

Every function accepts NumPy or JAX arrays; the ``*_np`` variants compute in float64 with NumPy and
are used to build schedules, spectra and Fisher lengths.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.fft as jfft
import numpy as np
import scipy.fft as sfft

BASES = ("dft", "dct", "identity")
SPATIAL_AXES = (-3, -2)


def check_basis(basis: str) -> str:
    if basis not in BASES:
        raise ValueError(f"unknown spectral basis {basis!r}; expected one of {BASES}")
    return basis


def to_spectral(x, basis: str):
    """Pixel-space (..., H, W, C) -> spectral coefficients u = B x (complex for the DFT)."""
    check_basis(basis)
    if basis == "dft":
        return jnp.fft.fft2(x, axes=SPATIAL_AXES, norm="ortho")
    if basis == "dct":
        return jfft.dctn(x, type=2, axes=SPATIAL_AXES, norm="ortho")
    return x


def from_spectral(u, basis: str):
    """Spectral coefficients -> pixel space x = B^-1 u (always real)."""
    check_basis(basis)
    if basis == "dft":
        return jnp.fft.ifft2(u, axes=SPATIAL_AXES, norm="ortho").real
    if basis == "dct":
        return jfft.idctn(u, type=2, axes=SPATIAL_AXES, norm="ortho")
    return u


def to_spectral_np(x: np.ndarray, basis: str) -> np.ndarray:
    """float64 NumPy version of :func:`to_spectral`."""
    check_basis(basis)
    x = np.asarray(x, dtype=np.float64)
    if basis == "dft":
        return np.fft.fft2(x, axes=SPATIAL_AXES, norm="ortho")
    if basis == "dct":
        return sfft.dctn(x, type=2, axes=SPATIAL_AXES, norm="ortho")
    return x


def from_spectral_np(u: np.ndarray, basis: str) -> np.ndarray:
    """float64 NumPy version of :func:`from_spectral` (real output)."""
    check_basis(basis)
    if basis == "dft":
        return np.fft.ifft2(u, axes=SPATIAL_AXES, norm="ortho").real
    if basis == "dct":
        return sfft.idctn(np.asarray(u, np.float64), type=2, axes=SPATIAL_AXES, norm="ortho")
    return np.asarray(u, np.float64)


def apply_diagonal(x, gain, basis: str):
    """Pixel-space image of a real diagonal operator: B^-1 (gain * B x).

    ``gain`` broadcasts against the spectral grid (H, W, C); a scalar or a (..., 1, 1, 1) array
    skips the transforms entirely.
    """
    if basis == "identity" or np.ndim(gain) == 0 or jnp.shape(gain)[-3:] == (1, 1, 1):
        return gain * x
    return from_spectral(gain * to_spectral(x, basis), basis)


def frequency_magnitude(height: int, width: int, basis: str = "dft") -> np.ndarray:
    """|k| on the (H, W) grid, in cycles per image (float64).

    DFT: sqrt(kx^2 + ky^2) with integer ``fftfreq`` indices. DCT: the index k of DCT-II is k/2
    cycles per image, so |k| = sqrt(k1^2 + k2^2) / 2. Identity: zeros.
    """
    check_basis(basis)
    if basis == "dft":
        ky = np.fft.fftfreq(height, d=1.0 / height)
        kx = np.fft.fftfreq(width, d=1.0 / width)
        return np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    if basis == "dct":
        k1 = np.arange(height, dtype=np.float64)
        k2 = np.arange(width, dtype=np.float64)
        return np.sqrt(k1[:, None] ** 2 + k2[None, :] ** 2) / 2.0
    return np.zeros((height, width))


def heat_eigenvalues(height: int, width: int) -> np.ndarray:
    """DCT heat-equation eigenvalues lambda_k = (pi k1/H)^2 + (pi k2/W)^2 on the (H, W) grid."""
    k1 = np.arange(height, dtype=np.float64)
    k2 = np.arange(width, dtype=np.float64)
    return (np.pi * k1[:, None] / height) ** 2 + (np.pi * k2[None, :] / width) ** 2


def self_conjugate_mask(height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of DFT frequencies with k = -k (mod N): real coefficients."""
    ky = np.arange(height)
    kx = np.arange(width)
    return ((-ky[:, None]) % height == ky[:, None]) & ((-kx[None, :]) % width == kx[None, :])


def mirror(a: np.ndarray) -> np.ndarray:
    """a(-k) on the DFT grid of the axes (0, 1): used to check Hermitian evenness (docs/math.md §1.3 V4)."""
    a = np.asarray(a)
    return np.roll(a[::-1, ::-1], shift=(1, 1), axis=(0, 1))
