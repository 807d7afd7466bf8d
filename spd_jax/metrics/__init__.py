"""Sample-quality metrics.

* :mod:`~spd_jax.metrics.frechet`: Fréchet distance (FID's formula) and its pixel-space form.
* :mod:`~spd_jax.metrics.kid`: Kernel Inception Distance (unbiased polynomial-kernel MMD²).
* :mod:`~spd_jax.metrics.swd`: multi-scale sliced Wasserstein distance (Laplacian pyramid).
* :mod:`~spd_jax.metrics.classifier`: the digits classifier and its scores.
* :mod:`~spd_jax.metrics.inception`, :mod:`~spd_jax.metrics.convert`, :mod:`~spd_jax.metrics.fid`:
  the FID InceptionV3 in Flax, its weight conversion, FID/KID with cached reference statistics.
* :mod:`~spd_jax.metrics.protocol`: the FID protocol stamp and the small-sample protection.
"""

from spd_jax.metrics.frechet import (
    feature_frechet_distance,
    frechet_distance,
    gaussian_statistics,
    pixel_frechet_distance,
    sqrtm_psd,
    trace_sqrt_product,
)
from spd_jax.metrics.kid import kernel_inception_distance, mmd2_unbiased
from spd_jax.metrics.protocol import FID_NUM_SAMPLES, SmallSampleError
from spd_jax.metrics.swd import sliced_wasserstein_distance

__all__ = [
    "FID_NUM_SAMPLES",
    "SmallSampleError",
    "feature_frechet_distance",
    "frechet_distance",
    "gaussian_statistics",
    "kernel_inception_distance",
    "mmd2_unbiased",
    "pixel_frechet_distance",
    "sliced_wasserstein_distance",
    "sqrtm_psd",
    "trace_sqrt_product",
]
