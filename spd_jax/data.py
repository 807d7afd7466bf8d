"""Embedded data sets that need no download (SPEC §0 "Embedded data").

* ``digits``: scikit-learn's 1797 bundled 8x8 digits, scaled x/8 - 1 to [-1, 1], shape (N, 8, 8, 1);
  the test split is a fixed seeded 20 %.
* ``patches``: 32x32x3 crops of scikit-image's bundled RGB photographs. Rows in the top 80 % of each
  photograph are training material (seeded random crops), the bottom 20 % the test split (a fixed
  grid of non-overlapping crops), so no training pixel is ever in a test crop.

All arrays are float32 in model units [-1, 1], NHWC.
"""

from __future__ import annotations

import functools

import numpy as np

from spd_jax.processes import check_name

EMBEDDED = ("digits", "patches")
SPLITS = ("train", "test")
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
PATCH = 32
TRAIN_FRACTION = 0.8


def _check_split(split: str) -> str:
    return check_name(split, SPLITS, "split")


@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    perm = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(0.2 * len(images)))
    return images[perm[n_test:]], images[perm[:n_test]]


def load_digits(split: str = "train", seed: int = 0, with_labels: bool = False):
    """The bundled 8x8 digits in [-1, 1], (N, 8, 8, 1) float32; labels too if ``with_labels``."""
    _check_split(split)
    train, test = _digits(seed)
    images = train if split == "train" else test
    if not with_labels:
        return images.copy()
    from sklearn.datasets import load_digits as _load

    labels = _load().target
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(0.2 * len(labels)))
    return images.copy(), (labels[perm[n_test:]] if split == "train" else labels[perm[:n_test]]).copy()


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    import skimage.data

    return tuple(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8) for name in PHOTOS)


@functools.lru_cache(maxsize=4)
def _patches(split: str, crops_per_photo: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for photo in _photos():
        h, w, _ = photo.shape
        cut = int(TRAIN_FRACTION * h)
        if split == "train":
            ys = rng.integers(0, cut - PATCH + 1, size=crops_per_photo)
            xs = rng.integers(0, w - PATCH + 1, size=crops_per_photo)
            out.extend(photo[y : y + PATCH, x : x + PATCH] for y, x in zip(ys, xs, strict=True))
        else:
            for y in range(cut, h - PATCH + 1, PATCH):
                for x in range(0, w - PATCH + 1, PATCH):
                    out.append(photo[y : y + PATCH, x : x + PATCH])
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


def load_patches(split: str = "train", crops_per_photo: int = 512, seed: int = 0) -> np.ndarray:
    """32x32x3 photo crops in [-1, 1], float32 (N, 32, 32, 3).

    ``train``: ``crops_per_photo`` seeded random crops from the top 80 % of each photograph;
    ``test``: every non-overlapping crop of the bottom 20 % (a fixed set).
    """
    _check_split(split)
    if crops_per_photo < 1:
        raise ValueError(f"crops_per_photo must be >= 1; got {crops_per_photo}")
    return _patches(split, int(crops_per_photo), int(seed)).copy()


def load_embedded(name: str, split: str = "train", **kwargs) -> np.ndarray:
    """Load an embedded data set by name ("digits" or "patches")."""
    check_name(name, EMBEDDED, "embedded dataset")
    return load_digits(split, **kwargs) if name == "digits" else load_patches(split, **kwargs)
