"""Multi-scale sliced Wasserstein distance (SWD) over a Laplacian pyramid, after Karras et al.,
"Progressive growing of GANs" (ICLR 2018), Appendix D.

Each image set is decomposed into a Laplacian pyramid (5x5 binomial filter, mirror boundaries);
at every level, 7x7xC neighbourhoods ("descriptors") are drawn at seeded random positions,
normalised per channel, and the two descriptor sets are compared by the 1-D Wasserstein-1
distance of their projections on random unit directions (seeded), averaged over directions.
Values are reported x 1e3, as in the paper.

Deviation (default): both sets are normalised with the *reference* set's per-level, per-channel
mean and standard deviation. The paper normalises each set with its own statistics, which makes
the metric blind to global brightness and contrast shifts; ``per_set_normalization=True``
restores that behaviour.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
GAUSSIAN_5X5 = np.outer(_BINOMIAL, _BINOMIAL) / 256.0


def _filter(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return scipy.ndimage.convolve(images, kernel[None, :, :, None], mode="mirror")


def pyramid_down(images: np.ndarray) -> np.ndarray:
    """Blur with the 5x5 binomial filter and keep every second pixel: (N, H, W, C) -> (N, H/2, W/2, C)."""
    return _filter(images, GAUSSIAN_5X5)[:, ::2, ::2]


def pyramid_up(images: np.ndarray) -> np.ndarray:
    """Zero-insertion up-sampling followed by 4x the binomial filter: (N, H, W, C) -> (N, 2H, 2W, C)."""
    n, h, w, c = images.shape
    up = np.zeros((n, 2 * h, 2 * w, c), images.dtype)
    up[:, ::2, ::2] = images
    return _filter(up, 4.0 * GAUSSIAN_5X5)


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Laplacian pyramid of images (N, H, W, C), finest level first; the last level is the
    low-pass residual. H and W must be divisible by 2**(num_levels - 1)."""
    levels = [np.asarray(images, np.float64)]
    for _ in range(1, num_levels):
        levels.append(pyramid_down(levels[-1]))
        levels[-2] = levels[-2] - pyramid_up(levels[-1])
    return levels


def pyramid_resolutions(height: int, width: int, *, min_resolution: int = 16, descriptor_size: int = 7) -> list[int]:
    """Level heights (pixels) used for images of ``height`` x ``width``: halving while both sides
    are even and their halves stay >= max(``min_resolution``, ``descriptor_size``); the full
    resolution is always included."""
    limit = max(min_resolution, descriptor_size)
    resolutions = [height]
    while height % 2 == 0 and width % 2 == 0 and min(height, width) // 2 >= limit:
        height, width = height // 2, width // 2
        resolutions.append(height)
    return resolutions


def _descriptors(level: np.ndarray, images: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """size x size x C neighbourhoods of ``level`` (N, H, W, C) centred at (ys, xs) of ``images``."""
    offsets = np.arange(-(size // 2), size // 2 + 1)
    rows = (ys[:, None] + offsets)[:, :, None]
    cols = (xs[:, None] + offsets)[:, None, :]
    return level[images[:, None, None], rows, cols]


def _normalise(desc: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((desc - mean) / np.maximum(std, 1e-12)).reshape(len(desc), -1).astype(np.float32)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    """Mean over ``directions`` (D, K) of the 1-D Wasserstein-1 distance between projections of
    equally many descriptors a, b (M, D)."""
    directions = np.asarray(directions, a.dtype).T
    proj_a = np.sort(directions @ a.T, axis=1)
    proj_b = np.sort(directions @ b.T, axis=1)
    return float(np.abs(proj_a - proj_b).mean(dtype=np.float64))


def sliced_wasserstein_distance(
    reference: np.ndarray,
    images: np.ndarray,
    *,
    descriptor_size: int = 7,
    descriptors_per_image: int = 128,
    num_repeats: int = 4,
    directions_per_repeat: int = 128,
    min_resolution: int = 16,
    per_set_normalization: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Multi-scale SWD x 1e3 between ``reference`` and ``images`` (N, H, W, C), model units.

    Both sets contribute ``descriptors_per_image`` descriptors from each of min(N_ref, N)
    seeded-randomly chosen images. Descriptor centres and projection directions depend only on
    ``seed`` and the set sizes and are shared by the two sets (common random numbers), so a set
    compared with itself scores exactly 0. Returns {"swd": mean over levels, "swd_<h>px": per level}.
    """
    reference, images = np.asarray(reference), np.asarray(images)
    if reference.shape[1:] != images.shape[1:] or reference.ndim != 4:
        raise ValueError(f"need two image sets (N, H, W, C) of equal shape; got {reference.shape}, {images.shape}")
    if min(reference.shape[1:3]) < descriptor_size:
        raise ValueError(f"images {reference.shape[1:3]} are smaller than the {descriptor_size}px descriptor")
    resolutions = pyramid_resolutions(*reference.shape[1:3], min_resolution=min_resolution,
                                      descriptor_size=descriptor_size)
    count = min(len(reference), len(images))
    subsets = [s[np.random.default_rng([seed, 0]).choice(len(s), count, replace=False)] for s in (reference, images)]
    pick = np.repeat(np.arange(count), descriptors_per_image)
    position_rng = np.random.default_rng([seed, 1])
    direction_rng = np.random.default_rng([seed, 2])
    pyramids = [laplacian_pyramid(s, len(resolutions)) for s in subsets]
    result = {}
    half = descriptor_size // 2
    for level, resolution in enumerate(resolutions):
        _, height, width, _ = pyramids[0][level].shape
        ys = position_rng.integers(half, height - half, size=len(pick))
        xs = position_rng.integers(half, width - half, size=len(pick))
        desc_ref, desc = (_descriptors(p[level], pick, ys, xs, descriptor_size) for p in pyramids)
        mean, std = desc_ref.mean(axis=(0, 1, 2)), desc_ref.std(axis=(0, 1, 2))
        if per_set_normalization:
            desc = _normalise(desc, desc.mean(axis=(0, 1, 2)), desc.std(axis=(0, 1, 2)))
        else:
            desc = _normalise(desc, mean, std)
        desc_ref = _normalise(desc_ref, mean, std)
        distances = []
        for _ in range(num_repeats):
            directions = direction_rng.standard_normal((desc.shape[1], directions_per_repeat))
            directions /= np.linalg.norm(directions, axis=0, keepdims=True)
            distances.append(sliced_wasserstein(desc_ref, desc, directions))
        result[f"swd_{resolution}px"] = 1e3 * float(np.mean(distances))
    result["swd"] = float(np.mean([result[f"swd_{r}px"] for r in resolutions]))
    return result
