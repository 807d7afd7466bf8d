"""Image-conditioned tasks as pure functions: degradations, conditioning inputs, known-pixel projection.

* Super-resolution: ``area_downsample`` (mean over factor x factor blocks) and ``upsample``; the
  network is conditioned on the up-sampled low-resolution image (docs/math.md §0 "Conditional tasks").
* Inpainting: per-example ``box_masks`` and ``free_form_masks`` (1 = known pixel, shape
  (B, H, W, 1)); the network is conditioned on concat(mask * x, mask).
* ``known_pixel_projection``: enforce the known pixels at every sampler step,
  u <- B[m * B^-1(alpha_s B y + sigma_s B z) + (1 - m) * B^-1 u]. Exact for frequency-independent
  processes; for spectral processes it is an approximation (the mask does not commute with B).
* :class:`Task` names a task (``""`` = unconditional generation, ``sr``, ``inpaint``);
  :func:`degrade` turns clean images into a :class:`Degraded` batch (conditioning image, display
  input, baseline estimate, mask, known pixels); :func:`sample_with_known_pixels` runs any sampler
  with the known pixels re-imposed.
* ``psnr`` / ``ssim`` from scikit-image, per image, on [-1, 1] data.

Randomness is per example (docs/math.md §0): the mask of example i is drawn from
fold_in(fold_in(key, MASK_STREAM), i), so a degradation does not depend on batch position or
device count.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.diffusion import samplers
from spd_jax.diffusion.rng import example_keys, per_example_normal

#: task names: "" = unconditional generation, "sr" = super-resolution, "inpaint" = inpainting
TASK_NAMES = ("", "sr", "inpaint")
TASK_LABELS = {"": "generation", "sr": "super-resolution", "inpaint": "inpainting"}
MASKS = ("box", "free_form")
FACTORS = (2, 4)
#: the estimate each task's outputs are compared with ("" has none: it is compared with data)
BASELINES = {"sr": "bicubic", "inpaint": "mean_fill"}
#: fold_in constant of the degradation stream (distinct from the loss's streams 0..4)
MASK_STREAM = 0x6D61736B


class Task(NamedTuple):
    """What a model generates: ``name`` from :data:`TASK_NAMES` and its options."""

    name: str = ""
    factor: int = 4
    mask: str = "box"
    enforce_known: bool = True

    @property
    def label(self) -> str:
        return TASK_LABELS[self.name]

    @property
    def conditional(self) -> bool:
        return bool(self.name)

    @property
    def projects(self) -> bool:
        """Whether sampling re-imposes known pixels (inpainting with ``enforce_known``)."""
        return self.name == "inpaint" and bool(self.enforce_known)

    @property
    def variant(self) -> str:
        """A short file-name stem: ``sr4``, ``inpaint_box`` ('' for unconditional generation)."""
        return {"": "", "sr": f"sr{self.factor}", "inpaint": f"inpaint_{self.mask}"}[self.name]

    def cond_channels(self, image_channels: int) -> int:
        """Channels of the conditioning image (0 for unconditional generation)."""
        return {"": 0, "sr": image_channels, "inpaint": image_channels + 1}[self.name]


class Degraded(NamedTuple):
    """A batch's degradation: ``cond`` the network's conditioning image, ``display`` what an
    "input" panel shows (nearest up-sampled low-res image / masked image), ``baseline`` the
    bicubic / mean-fill estimate, ``mask`` (B, H, W, 1) with 1 = known (ones for SR) and ``known``
    m * x (the known pixels; zeros for SR)."""

    cond: Any
    display: Any
    baseline: Any
    mask: Any
    known: Any


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


def masks(task: Task, key, shape, index=None):
    """Per-example masks (B, H, W, 1) of an inpainting task, 1 = known; example i's mask depends
    only on (key, i)."""
    make = box_masks if task.mask == "box" else free_form_masks
    return make(key, shape, index=index)


def degrade_low_res(task: Task, low) -> Degraded:
    """SR degradation from given low-resolution images (B, H/f, W/f, C)."""
    f = task.factor
    cond = upsample(low, f, "bicubic")
    ones = jnp.ones(cond.shape[:3] + (1,), cond.dtype)
    return Degraded(cond, upsample(low, f, "nearest"), cond, ones, jnp.zeros_like(cond))


def degrade_masked(images, mask) -> Degraded:
    """Inpainting degradation of ``images`` with given masks (B, H, W, 1)."""
    known = images * mask
    return Degraded(inpainting_condition(images, mask), known, mean_fill(images, mask), mask, known)


def degrade(task: Task, images, key, index=None) -> Degraded | None:
    """The task's degradation of clean ``images`` (B, H, W, C), None for unconditional generation;
    ``key`` draws the masks (from fold_in(key, MASK_STREAM), per example with the global ``index``)."""
    if task.name == "sr":
        return degrade_low_res(task, area_downsample(images, task.factor))
    if task.name == "inpaint":
        return degrade_masked(images, masks(task, jax.random.fold_in(key, MASK_STREAM), images.shape, index))
    return None


def sample_with_known_pixels(denoiser, process, *, known, mask, enforce_known: bool = True, **sample_kwargs):
    """:func:`spd_jax.diffusion.samplers.sample` for a conditioned ``denoiser``; with
    ``enforce_known`` the known pixels ``known`` (= m * y, zeros elsewhere) are re-imposed after
    every step through :func:`known_pixel_projection` and pasted exactly into the result (where
    ``mask`` > 0.5). Returns (x, info)."""
    if not enforce_known:
        return samplers.sample(denoiser, process, **sample_kwargs)
    project = known_pixel_projection(process, known, mask)
    x, info = samplers.sample(denoiser, process, project=project, **sample_kwargs)
    return jnp.where(mask > 0.5, known, x), info


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


def paired_metrics(references, estimates) -> dict:
    """PSNR and SSIM of ``estimates`` against ``references`` (paired, per image): mean, its
    standard error, the median and the PSNR of the mean squared error over the set."""
    p, s = psnr(references, estimates), ssim(references, estimates)
    n = len(p)
    return {
        "psnr": float(p.mean()), "psnr_sem": float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        # the mean is dominated by near-flat images (PSNR >> 50 dB): also the median, and the PSNR of
        # the mean squared error over the set (10 log10(range^2 / mean MSE))
        "psnr_median": float(np.median(p)), "psnr_of_mean_mse": float(-10.0 * np.log10(np.mean(10.0 ** (-p / 10.0)))),
        "ssim": float(s.mean()), "ssim_sem": float(s.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    }
