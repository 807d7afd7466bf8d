"""Image-conditioned tasks as pure functions: degradations, conditioning inputs, known-pixel projection.

* Super-resolution: ``area_downsample`` (mean over factor x factor blocks) and ``upsample``; the
  network is conditioned on the up-sampled low-resolution image (SPEC §0 "Conditional tasks").
* Inpainting: per-example ``box_masks`` and ``free_form_masks`` (1 = known pixel, shape
  (B, H, W, 1)); the network is conditioned on concat(mask * x, mask).
* ``known_pixel_projection``: enforce the known pixels at every sampler step,
  u <- B[m * B^-1(alpha_s B y + sigma_s B z) + (1 - m) * B^-1 u]. Exact for frequency-independent
  processes; for spectral processes it is an approximation (the mask does not commute with B).
* ``psnr`` / ``ssim`` from scikit-image, per image, on [-1, 1] data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.rng import example_keys, per_example_normal

TASKS = ("super_resolution", "inpainting")


def _check_images(x, what: str = "images") -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape (B, H, W, C); got {x.shape}")


def area_downsample(x, factor: int):
    """Mean over non-overlapping factor x factor blocks: (B, H, W, C) -> (B, H/f, W/f, C)."""
    _check_images(x)
    b, h, w, c = x.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"down-sampling factor must be >= 1 and divide H={h}, W={w}; got {factor}")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x, factor: int, method: str = "bicubic"):
    """Resize (B, h, w, C) -> (B, h f, w f, C) with ``jax.image.resize`` (bicubic, linear, nearest)."""
    _check_images(x)
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * factor, w * factor, c), method=method)


def super_resolution(x, factor: int):
    """Returns (low_res, condition): the area down-sampled image and its bicubic up-sampling."""
    low = area_downsample(x, factor)
    return low, upsample(low, factor)


def box_masks(key, shape, min_frac: float = 0.25, max_frac: float = 0.5, index=None):
    """One random axis-aligned hole per example; mask (B, H, W, 1) with 1 = known, 0 = missing."""
    b, h, w = shape[0], shape[1], shape[2]
    if not 0 < min_frac <= max_frac < 1:
        raise ValueError(f"need 0 < min_frac <= max_frac < 1; got {min_frac}, {max_frac}")
    keys = example_keys(key, b, index=index)

    def one(k):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        bh = jnp.round(jax.random.uniform(k1, minval=min_frac, maxval=max_frac) * h).astype(jnp.int32)
        bw = jnp.round(jax.random.uniform(k2, minval=min_frac, maxval=max_frac) * w).astype(jnp.int32)
        y0 = jax.random.randint(k3, (), 0, h - bh + 1)
        x0 = jax.random.randint(k4, (), 0, w - bw + 1)
        rows = jnp.arange(h)[:, None]
        cols = jnp.arange(w)[None, :]
        hole = (rows >= y0) & (rows < y0 + bh) & (cols >= x0) & (cols < x0 + bw)
        return (~hole).astype(jnp.float32)[..., None]

    return jax.vmap(one)(keys)


def free_form_masks(key, shape, num_strokes: int = 4, max_width: float = 0.12, index=None):
    """Random brush strokes (thick line segments) per example; 1 = known, 0 = missing."""
    b, h, w = shape[0], shape[1], shape[2]
    keys = example_keys(key, b, index=index)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5

    def one(k):
        ends = jax.random.uniform(k, (num_strokes, 4)) * jnp.array([h, w, h, w], jnp.float32)
        widths = jax.random.uniform(jax.random.fold_in(k, 1), (num_strokes,),
                                    minval=0.04, maxval=max_width) * max(h, w)

        def stroke(seg, width):
            p = jnp.stack([rows + 0 * cols, cols + 0 * rows], -1)
            a, d = seg[:2], seg[2:] - seg[:2]
            s = jnp.clip(jnp.sum((p - a) * d, -1) / jnp.maximum(jnp.sum(d * d), 1e-6), 0.0, 1.0)
            dist = jnp.linalg.norm(p - (a + s[..., None] * d), axis=-1)
            return dist <= width / 2

        hole = jnp.any(jax.vmap(stroke)(ends, widths), axis=0)
        return (~hole).astype(jnp.float32)[..., None]

    return jax.vmap(one)(keys)


def inpainting_condition(x, mask):
    """The inpainting network input: concat(mask * x, mask) along channels (C + 1 channels)."""
    _check_images(x)
    return jnp.concatenate([x * mask, mask], axis=-1)


def mean_fill(x, mask):
    """Baseline: fill missing pixels with each image's mean over its known pixels, per channel."""
    known = jnp.sum(mask, axis=(1, 2), keepdims=True)
    mean = jnp.sum(x * mask, axis=(1, 2), keepdims=True) / jnp.maximum(known, 1.0)
    return mask * x + (1 - mask) * mean


def known_pixel_projection(process, y, mask):
    """A sampler hook ``project(x, s, key, step, index) -> x`` enforcing the known pixels of ``y``.

    At level s the known pixels are replaced by a fresh forward sample of y: m * x_s(y) +
    (1 - m) * x, with x_s(y) = B^-1(alpha_s B y + sigma_s B z), z drawn per example and step. At
    s = 0 this copies y's known pixels exactly.
    """
    _check_images(y)
    if mask.shape[:3] != y.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match the images {y.shape}")

    def project(x, s, key, step, index=None):
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
        z = per_example_normal(jax.random.fold_in(key, 0x5EED), x.shape, x.dtype, index=index, step=step)
        alpha, sigma = process.marginal(s)
        noisy = process.apply(y, alpha) + process.apply(z, sigma)
        return jnp.where(mask > 0.5, noisy, x)

    return project


def psnr(reference, estimate, data_range: float = 2.0) -> np.ndarray:
    """Per-image PSNR (dB) with scikit-image, images in [-1, 1] (data range 2)."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, est = np.asarray(reference, np.float64), np.clip(np.asarray(estimate, np.float64), -1, 1)
    return np.array([peak_signal_noise_ratio(r, e, data_range=data_range) for r, e in zip(ref, est, strict=True)])


def ssim(reference, estimate, data_range: float = 2.0) -> np.ndarray:
    """Per-image SSIM with scikit-image (channel axis last; 7x7 window, or the image size if smaller)."""
    from skimage.metrics import structural_similarity

    ref, est = np.asarray(reference, np.float64), np.clip(np.asarray(estimate, np.float64), -1, 1)
    win = min(7, ref.shape[1], ref.shape[2])
    win -= 1 - win % 2  # odd
    return np.array(
        [structural_similarity(r, e, data_range=data_range, channel_axis=-1, win_size=win)
         for r, e in zip(ref, est, strict=True)]
    )
