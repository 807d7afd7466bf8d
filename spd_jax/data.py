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


# ---------------------------------------------------------------------------------------------
# training pipelines (grain)
# ---------------------------------------------------------------------------------------------

#: Datasets read from a user-prepared TFDS data_dir (array_record), with their image feature.
TFDS_DATASETS = {"cifar10": "image", "celeb_a": "image", "mnist": "image", "fashion_mnist": "image",
                 "svhn_cropped": "image"}
DATASETS = EMBEDDED + tuple(TFDS_DATASETS)
#: Center crop (pixels) applied to CelebA's 218x178 faces before resizing (the usual 64 px protocol).
CELEBA_CROP = 140


def check_dataset(name: str) -> str:
    return check_name(name, DATASETS, "dataset")


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares TFDS dataset ``name`` for :func:`tfds_source`."""
    where = f" --data_dir={data_dir}" if data_dir else ""
    return f"tfds build {name}{where} --file_format=array_record"


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """Random-access source over a prepared TFDS dataset (array_record); no download is tried.

    Raises FileNotFoundError with the exact preparation command when the dataset is missing.
    """
    check_name(name, tuple(TFDS_DATASETS), "TFDS dataset")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared() and "array_record" in str(builder.info.file_format)
    if not prepared:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in array_record format under "
            f"{builder.data_dir!s}. Prepare it once (needs TensorFlow, e.g. `pip install tensorflow-cpu`):\n"
            f"  {prepare_command(name, data_dir)}\n"
            "then pass the same directory as config.data.tfds_data_dir."
        )
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def to_model_units(image, size: int | None = None, center_crop: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> float32 in [-1, 1], optionally center-cropped then resized to ``size``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if center_crop:
        h, w = image.shape[:2]
        top, left = (h - center_crop) // 2, (w - center_crop) // 2
        image = image[top : top + center_crop, left : left + center_crop]
    if size is not None and image.shape[:2] != (size, size):
        from PIL import Image

        squeeze = image.shape[-1] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
        image = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))
        image = image[..., None] if squeeze else image
    return image.astype(np.float32) / 127.5 - 1.0


class TFDSImages:
    """A grain-compatible random-access source of TFDS images in model units (H, W, C)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_size: int | None = None):
        self._source = tfds_source(name, split, data_dir)
        self._feature = TFDS_DATASETS[name]
        self._size = image_size
        self._crop = CELEBA_CROP if name == "celeb_a" else None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        return to_model_units(self._source[index][self._feature], self._size, self._crop)


def image_source(name: str, split: str = "train", *, data_dir: str | None = None, image_size: int | None = None,
                 seed: int = 0, crops_per_photo: int = 512):
    """Random-access images (len, [i] -> float32 (H, W, C) in [-1, 1]) for any dataset name.

    Embedded sets come back as in-memory arrays; TFDS sets are read lazily from ``data_dir``.
    """
    check_dataset(name)
    if name == "digits":
        return load_digits(split, seed=seed)
    if name == "patches":
        return load_patches(split, crops_per_photo=crops_per_photo, seed=seed)
    return TFDSImages(name, split, data_dir, image_size)


def check_model_units(images, what: str = "images", ndim: int | None = None) -> np.ndarray:
    """``images`` as an array; raises a ValueError naming ``what``, its shape or range and what is
    expected unless they are finite floats in model units [-1, 1] with ``ndim`` axes (NHWC: 4,
    one image HWC: 3)."""
    images = np.asarray(images)
    if ndim is not None and images.ndim != ndim:
        layout = {3: "(H, W, C)", 4: "(N, H, W, C)"}.get(ndim, f"{ndim} axes")
        raise ValueError(f"{what} has shape {images.shape}: expected {layout}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"{what} has dtype {images.dtype}: expected floats in model units [-1, 1] (uint8 x: x / 127.5 - 1)"
        )
    if images.size:
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"{what} has values in [{lo:.4g}, {hi:.4g}]: expected model units [-1, 1] (uint8 x: x / 127.5 - 1)"
            )
    return images


def _flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def make_pipeline(
    source,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 4,
):
    """An endless grain stream of local batches ``{"image": (batch_size, H, W, C)}``.

    The global stream is the same for every process count: epochs are reshuffled with ``seed``,
    flips are drawn per stream position, and global batch b is the concatenation over processes p
    of local batch b of process p, whose rows it alone reads. ``batch_size`` is the *local* batch
    (global batch / process_count). ``iter()`` of the result is a grain DatasetIterator whose
    ``get_state()`` / ``set_state()`` checkpoint the position exactly.
    """
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}); got {process_index}")
    if len(source) < 1:
        raise ValueError("the data source is empty")
    check_model_units(source[0], "item 0 of the data source", ndim=3)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)
    if flip:
        ds = ds.random_map(_flip, seed=seed + 1)
    ds = ds.map(lambda image: {"image": np.asarray(image, np.float32)})
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def spectrum_images(source, num_images: int, flip: bool) -> np.ndarray:
    """The first ``num_images`` images of ``source`` (N, H, W, C) for a spectrum estimate, with
    their mirror images appended when training uses flips (same preprocessing as training)."""
    count = min(int(num_images), len(source))
    if isinstance(source, np.ndarray):
        images = source[:count]
    else:
        images = np.stack([source[i] for i in range(count)])
    check_model_units(images, f"the first {count} images of the data source", ndim=4)
    return np.concatenate([images, images[:, :, ::-1]]) if flip else images
