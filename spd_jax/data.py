"""Embedded data sets that need no download (docs/math.md §0 "Embedded data").

* ``digits``: scikit-learn's 1797 bundled 8x8 digits, scaled x/8 - 1 to [-1, 1], shape (N, 8, 8, 1);
  the test split is a fixed seeded 20 %.
* ``patches``: 32x32x3 crops of scikit-image's bundled RGB photographs. Rows in the top 80 % of each
  photograph are training material (seeded random crops), the bottom 20 % the test split (a fixed
  grid of non-overlapping crops), so no training pixel is ever in a test crop.
* ``mixture2d``: the 2-D Gaussian-mixture toy of docs/math.md §7.4 (49 components, means on
  linspace(-1, 1, 7)^2, std 0.04, equal weights) as "images" of one pixel with two channels,
  shape (N, 1, 1, 2); fixed seeded draws (train and test from different seeds). A point cloud, not
  an image set: its values reach slightly past [-1, 1] (:data:`POINT_BOUND`).

All arrays are float32 NHWC in model units [-1, 1] (the point clouds within +-``POINT_BOUND``).
"""

from __future__ import annotations

import functools

import numpy as np

from spd_jax.diffusion.processes import check_name

EMBEDDED = ("digits", "patches", "mixture2d")
POINT_DATASETS = ("mixture2d",)  #: embedded point clouds: no image spectrum, PNG grids or image metrics
MIXTURE_STD = 0.04  #: std of every component of ``mixture2d``
MIXTURE_SIZES = {"train": 20_000, "test": 5_000}  #: points per split of ``mixture2d``
POINT_BOUND = 1.5  #: largest |value| a point cloud may hold (the mixture's edge components pass 1)
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


def mixture_means() -> np.ndarray:
    """(49, 2) component means of ``mixture2d`` on linspace(-1, 1, 7)^2 (row-major in the first axis)."""
    grid = np.linspace(-1.0, 1.0, 7)
    return np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)


@functools.lru_cache(maxsize=4)
def _mixture(split: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    means = mixture_means()
    count = MIXTURE_SIZES[split]
    points = means[rng.integers(0, len(means), count)] + MIXTURE_STD * rng.standard_normal((count, 2))
    return points.astype(np.float32).reshape(count, 1, 1, 2)


class PointCloud:
    """Random-access rows of a point cloud (N, 1, 1, C) float32; ``bound`` is the largest |value|
    the data pipeline accepts from it (:data:`POINT_BOUND`)."""

    bound = POINT_BOUND

    def __init__(self, points: np.ndarray):
        self.points = np.asarray(points, np.float32)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.points[int(index)]

    def __getitems__(self, indices) -> np.ndarray:
        return self.points[np.asarray(indices, int)]


def load_mixture2d(split: str = "train", seed: int = 0) -> np.ndarray:
    """Seeded draws from the 2-D 7x7 mixture (docs/math.md §7.4), (N, 1, 1, 2) float32."""
    _check_split(split)
    return _mixture(split, int(seed)).copy()


def load_embedded(name: str, split: str = "train", **kwargs) -> np.ndarray:
    """Load an embedded data set by name ("digits", "patches" or "mixture2d")."""
    check_name(name, EMBEDDED, "embedded dataset")
    loader = {"digits": load_digits, "patches": load_patches, "mixture2d": load_mixture2d}[name]
    return loader(split, **kwargs)


# ---------------------------------------------------------------------------------------------
# training pipelines (grain)
# ---------------------------------------------------------------------------------------------

#: Datasets read from a user-prepared TFDS data_dir (array_record), with their image feature.
TFDS_DATASETS = {"cifar10": "image", "celeb_a": "image", "mnist": "image", "fashion_mnist": "image",
                 "svhn_cropped": "image"}
DATASETS = EMBEDDED + tuple(TFDS_DATASETS)
#: (default image side in pixels, channels) of every dataset; TFDS sets may be resized
#: (config.data.image_size), the embedded ones are used at their native size only
DATASET_SHAPES = {"digits": (8, 1), "patches": (PATCH, 3), "mixture2d": (1, 2), "cifar10": (32, 3), "celeb_a": (64, 3),
                  "mnist": (28, 1), "fashion_mnist": (28, 1), "svhn_cropped": (32, 3)}
#: Center crop (pixels) applied to CelebA's 218x178 faces before resizing (the usual 64 px protocol).
CELEBA_CROP = 140


def check_dataset(name: str) -> str:
    return check_name(name, DATASETS, "dataset")


def image_size(name: str, override: int = 0) -> int:
    """Side length (pixels) of the square images of dataset ``name``: ``override`` if > 0."""
    return int(override) if override else DATASET_SHAPES[check_dataset(name)][0]


def image_channels(name: str) -> int:
    """Channels of the images of dataset ``name``."""
    return DATASET_SHAPES[check_dataset(name)][1]


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares TFDS dataset ``name`` for :func:`tfds_source` without
    TensorFlow (:mod:`spd_jax.prepare`)."""
    where = f" --data_dir={data_dir}" if data_dir else " --data_dir=DIR"
    return f"python -m spd_jax.prepare {name}{where}"


def tfds_prepare_command(name: str, data_dir: str | None) -> str:
    """The same with TensorFlow's ``tfds`` command (``pip install 'spd_jax[tf]'``)."""
    where = f" --data_dir={data_dir}" if data_dir else ""
    return f"tfds build {name}{where} --file_format=array_record"


def tfds_source(name: str, split: str, data_dir: str | None = None, raw: bool = False):
    """Random-access source over a prepared TFDS dataset (array_record); no download is tried.
    ``raw``: records as serialized ``tf.Example`` bytes (decoded by :class:`TFDSImages`).

    Raises FileNotFoundError with the exact preparation command when the dataset is missing.
    """
    check_name(name, tuple(TFDS_DATASETS), "TFDS dataset")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    file_format = builder.info.file_format  # a FileFormat enum (str() gives 'FileFormat.ARRAY_RECORD')
    prepared = builder.is_prepared() and getattr(file_format, "value", file_format) == "array_record"
    if not prepared:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in array_record format under "
            f"{builder.data_dir!s}. Prepare it once, without TensorFlow (add --archive=FILE to use "
            f"a file you downloaded):\n  {prepare_command(name, data_dir)}\n"
            f"or with TensorFlow (pip install 'spd_jax[tf]'):\n  {tfds_prepare_command(name, data_dir)}\n"
            "then pass the same directory as config.data.tfds_data_dir."
        )
    kwargs = {}
    if raw:
        from tensorflow_datasets.core import decode

        kwargs["deserialize_method"] = decode.DeserializeMethod.RAW_BYTES
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)


def crop_and_resize(image, size: int | None = None, center_crop: int | None = None) -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 (H', W', C), optionally center-cropped then resized (bicubic) to
    ``size``."""
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
    return image


def to_model_units(image, size: int | None = None, center_crop: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> float32 in [-1, 1], optionally center-cropped then resized to ``size``."""
    return crop_and_resize(image, size, center_crop).astype(np.float32) / 127.5 - 1.0


class TFDSImages:
    """A grain-compatible random-access source of TFDS images in model units (H, W, C) float32,
    or uint8 (H, W, C) with ``uint8=True`` (see :meth:`uint8`).

    Records are read as raw bytes and only the image feature is decoded, with TFDS's own decoder
    for it (PIL, or OpenCV when installed): about twice as fast as decoding whole examples.
    ``__getitems__`` reads a batch of records in one call. Picklable (grain worker processes).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_size: int | None = None,
                 uint8: bool = False):
        self._args = (name, split, data_dir, image_size)
        self._source = tfds_source(name, split, data_dir, raw=True)
        self._key = TFDS_DATASETS[name]
        self._feature = self._source.dataset_info.features[self._key]
        self._size = image_size
        self._crop = CELEBA_CROP if name == "celeb_a" else None
        self._uint8 = bool(uint8)

    def uint8(self) -> "TFDSImages":
        """The same images as uint8 (H, W, C) (after the same crop and resize)."""
        if self._uint8:
            return self
        other = object.__new__(TFDSImages)
        other.__dict__.update(self.__dict__)
        other._uint8 = True
        return other

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, record: bytes) -> np.ndarray:
        from tensorflow_datasets.proto import tf_example_pb2

        example = tf_example_pb2.Example.FromString(record)
        encoded = example.features.feature[self._key].bytes_list.value[0]
        image = crop_and_resize(self._feature.decode_example_np(encoded), self._size, self._crop)
        return image if self._uint8 else image.astype(np.float32) / 127.5 - 1.0

    def __getitem__(self, index: int) -> np.ndarray:
        return self._decode(self._source[int(index)])

    def __getitems__(self, indices) -> list[np.ndarray]:
        return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]


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
    if name == "mixture2d":
        return PointCloud(load_mixture2d(split, seed=seed))
    return TFDSImages(name, split, data_dir, image_size)


def check_model_units(images, what: str = "images", ndim: int | None = None, bound: float = 1.0) -> np.ndarray:
    """``images`` as an array; raises a ValueError naming ``what``, its shape or range and what is
    expected unless they are finite floats in model units [-1, 1] (``[-bound, bound]``, e.g. for a
    point cloud) with ``ndim`` axes (NHWC: 4, one image HWC: 3)."""
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
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -bound - 1e-6 or hi > bound + 1e-6:
            expected = "model units [-1, 1] (uint8 x: x / 127.5 - 1)" if bound == 1.0 else f"values in [-{bound}, {bound}]"
            raise ValueError(f"{what} has values in [{lo:.4g}, {hi:.4g}]: expected {expected}")
    return images


def _with_flip_bit(row, rng: np.random.Generator):
    """(row, flip) at a stream position: one uniform draw per position, flipped below 0.5."""
    return row, rng.random() < 0.5


def _no_flip(row):
    return row, False


def _uint8_view(source):
    """``source`` delivering uint8 (H, W, C) images, for ``make_pipeline(..., uint8=True)``."""
    if hasattr(source, "uint8"):
        return source.uint8()
    array = np.asarray(source) if isinstance(source, np.ndarray) else None
    if array is not None and array.dtype == np.uint8:
        return array
    if array is not None and np.issubdtype(array.dtype, np.floating):
        check_model_units(array, "the data source", ndim=4)
        as_uint8 = np.rint((array.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
        if np.array_equal(as_uint8.astype(np.float32) / 127.5 - 1.0, array):
            return as_uint8
    raise ValueError(
        "uint8 delivery needs 8-bit images (a TFDS dataset, the patches or a uint8 array); these "
        "images are not of the form k / 127.5 - 1 (e.g. the digits): use the float32 pipeline"
    )


def _read_rows(source, rows) -> list | np.ndarray:
    if isinstance(source, np.ndarray):
        return source[np.asarray(rows, int)]
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        return getitems([int(i) for i in rows])
    return [source[int(i)] for i in rows]


class _ReadBatch:
    """Batch of (rows, flip bits) -> ``{"image": ...}``: float32 model units with the flips
    applied, or uint8 (plus ``"flip"`` bits when flipping) for :func:`to_model_units_on_device`.
    A module-level class so that grain can send it to worker processes."""

    def __init__(self, source, uint8: bool, flip: bool, convert: bool = False):
        self.source, self.uint8, self.flip, self.convert = source, uint8, flip, convert

    def __call__(self, element):
        rows, flips = element
        images = _read_rows(self.source, rows)
        if self.uint8:
            batch = {"image": np.stack(images).astype(np.uint8, copy=False)}
            if self.flip:
                batch["flip"] = np.asarray(flips, bool)
            return batch
        if self.convert:  # uint8 read, converted per batch: the same values as per image, faster
            images = UINT8_TO_MODEL_UNITS[np.stack(images)]
        else:
            images = np.stack([np.asarray(image, np.float32) for image in images])
        flips = np.asarray(flips, bool)
        if flips.any():
            images[flips] = images[flips, :, ::-1]
        return {"image": images}


class PipelineIterator:
    """Iterator over the local batches of :func:`make_pipeline`.

    ``get_state()`` is ``{"next_index": local batches delivered}`` (the same as a grain
    ``DatasetIterator`` over the batches), ``set_state()`` restarts the stream there. The state
    does not depend on threads, prefetch or worker processes, so those may change between a
    checkpoint and its resume. ``close()`` stops worker processes (also done on deletion).
    """

    def __init__(self, batches, read_options, worker_count: int, worker_buffer: int):
        self._batches = batches
        self._read_options = read_options
        self._worker_count = worker_count
        self._worker_buffer = worker_buffer
        self._next = 0
        self._it = None  # started lazily: set_state right after iter() starts no workers twice

    def _start(self):
        import grain

        ds = self._batches[self._next :].to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads its absl flags (defaults here)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._worker_count, per_worker_buffer_size=self._worker_buffer))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._next += 1
        if self._worker_count > 0:  # out of grain's shared memory, which is freed here, not at exit
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        index = int(state["next_index"])
        if index < 0:
            raise ValueError(f"the data iterator state {state!r} has a negative next_index")
        self.close()
        self._next = index

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Pipeline:
    """An endless stream of local batches; ``iter()`` gives a :class:`PipelineIterator`."""

    def __init__(self, batches, read_options, worker_count: int, worker_buffer: int):
        self._args = (batches, read_options, worker_count, worker_buffer)

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(*self._args)


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
    prefetch: int | None = None,
    worker_count: int = 0,
    worker_buffer: int = 2,
    uint8: bool = False,
) -> Pipeline:
    """An endless stream of local batches ``{"image": (batch_size, H, W, C)}``.

    The global stream is the same for every process count: epochs are reshuffled with ``seed``,
    flips are drawn per stream position, and global batch b is the concatenation over processes p
    of local batch b of process p, whose rows it alone reads. ``batch_size`` is the *local* batch
    (global batch / process_count). ``iter()`` of the result is a :class:`PipelineIterator` whose
    ``get_state()`` / ``set_state()`` checkpoint the position exactly.

    Throughput (none of these change the stream, so all may change between a checkpoint and
    its resume):

    * ``num_threads``: reader threads per process, each assembling whole batches (0 = read in
      the consuming thread);
    * ``prefetch``: batches read ahead per process (None = max(4, num_threads); fewer than
      ``num_threads`` leaves threads idle);
    * ``worker_count``: grain worker processes (``mp_prefetch``), each with ``num_threads``
      threads, working on every ``worker_count``-th batch; 0 = none. Past the GIL: use them when
      the host has cores to spare;
    * ``worker_buffer``: batches each worker process keeps ready;
    * ``uint8``: deliver ``{"image": uint8 (batch, H, W, C)}`` plus ``"flip"`` bool (batch,)
      when ``flip``, with the flips *not* applied: :func:`to_model_units_on_device` then gives the
      float32 batch of the default path, on the accelerator (4x less host memory traffic and
      transfer, no float conversion on the host). Needs 8-bit images: a TFDS dataset, the
      patches or a uint8 array (not the digits).
    """
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}); got {process_index}")
    for name, value, low in (("num_threads", num_threads, 0), ("worker_count", worker_count, 0),
                             ("worker_buffer", worker_buffer, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}; got {value}")
    if prefetch is not None and prefetch < 1:
        raise ValueError(f"prefetch must be >= 1; got {prefetch}")
    if len(source) < 1:
        raise ValueError("the data source is empty")
    if uint8:
        source = _uint8_view(source)
        first = np.asarray(source[0])
        if first.dtype != np.uint8 or first.ndim != 3:
            raise ValueError(f"item 0 of the uint8 data source has dtype {first.dtype} and shape "
                             f"{first.shape}: expected uint8 (H, W, C)")
        convert = False
    else:
        check_model_units(source[0], "item 0 of the data source", ndim=3, bound=getattr(source, "bound", 1.0))
        convert = hasattr(source, "uint8")  # e.g. TFDSImages: read 8-bit, convert whole batches
        if convert:
            source = source.uint8()
    rows = grain.MapDataset.range(len(source))
    if shuffle:
        rows = rows.shuffle(seed=seed)
    rows = rows.repeat(None)
    rows = rows.random_map(_with_flip_bit, seed=seed + 1) if flip else rows.map(_no_flip)
    batches = rows.batch(batch_size, drop_remainder=True)[process_index::process_count]
    batches = batches.map(_ReadBatch(source, bool(uint8), bool(flip), convert))
    prefetch = max(4, int(num_threads)) if prefetch is None else int(prefetch)
    options = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=prefetch)
    return Pipeline(batches, options, int(worker_count), int(worker_buffer))


#: model units of every uint8 value, exactly as the host computes them (x / 127.5 - 1 in float32)
UINT8_TO_MODEL_UNITS = np.arange(256, dtype=np.uint8).astype(np.float32) / 127.5 - 1.0


def to_model_units_on_device(batch):
    """uint8 images (and flip bits) from ``make_pipeline(..., uint8=True)`` -> float32 model
    units, flipped where ``"flip"`` is set: pure ``jax.numpy``, to call inside the jitted train
    step. ``batch`` is a dict ``{"image": uint8 (..., H, W, C)[, "flip": bool (...)]}`` (any
    leading axes, e.g. (steps, batch)) or a bare uint8 array; the result has the same form with
    float32 ``"image"`` and no ``"flip"``. Float images (the default pipeline) pass through
    unchanged, so the step may call this unconditionally. Equals the default pipeline's batch
    exactly."""
    import jax.numpy as jnp

    is_dict = isinstance(batch, dict)
    image = batch["image"] if is_dict else batch
    if jnp.issubdtype(image.dtype, jnp.floating):
        out = image
    else:
        # a 256-entry table of the host's x / 127.5 - 1 (XLA would turn the division into a
        # multiplication by 1 / 127.5, one ulp off for some x)
        out = jnp.asarray(UINT8_TO_MODEL_UNITS)[image.astype(jnp.int32)]
    flips = batch.get("flip") if is_dict else None
    if flips is not None:
        out = jnp.where(flips[..., None, None, None], jnp.flip(out, axis=-2), out)
    if not is_dict:
        return out
    rest = {k: v for k, v in batch.items() if k not in ("image", "flip")}
    return {**rest, "image": out}


def with_model_units(loss_fn):
    """``loss_fn(params, batch, key)`` taking the batches of ``make_pipeline(..., uint8=True)``:
    :func:`to_model_units_on_device` runs first, inside the jitted step (float batches pass
    through, so wrapping is harmless on the default path). Wrap the outermost loss (e.g. after
    ``losses.conditioned_loss``, which reads ``batch["image"]``)."""

    def loss(params, batch, key):
        return loss_fn(params, to_model_units_on_device(batch), key)

    return loss


def take(source, rows) -> np.ndarray:
    """Images ``rows`` of a random-access ``source`` stacked as float32 (N, H, W, C)."""
    images = _read_rows(source, rows)
    return np.asarray(images if isinstance(images, np.ndarray) else np.stack(images), np.float32)


def spectrum_images(source, num_images: int, flip: bool) -> np.ndarray:
    """The first ``num_images`` images of ``source`` (N, H, W, C) for a spectrum estimate, with
    their mirror images appended when training uses flips (same preprocessing as training)."""
    count = min(int(num_images), len(source))
    images = take(source, np.arange(count))
    check_model_units(images, f"the first {count} images of the data source", ndim=4)
    return np.concatenate([images, images[:, :, ::-1]]) if flip else images
