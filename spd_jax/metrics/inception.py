"""InceptionV3 in the FID variant of pytorch-fid (``FIDInceptionA/C/E_1/E_2`` blocks), in Flax.

Kept here because no JAX library ships FID's Inception: the alternatives need TensorFlow or torch.

The network is the 2015 TensorFlow Inception graph that FID is defined with, as ported by
pytorch-fid: the torchvision layout with every average pool excluding padding from the count and
max-pooling in the branch pool of the last block. Only the 2048-d pool3 features are computed.

Input pipeline (pytorch-fid): images are quantised to 8 bits as when written to PNG, scaled to
[0, 1], resized to 299x299 with PyTorch's bilinear rule (``align_corners=False``, no antialiasing)
and mapped to [-1, 1]. Greyscale images are repeated to three channels.

Module names mirror the PyTorch state dict, so converting weights is a rename plus a transpose of
convolution kernels (see :mod:`spd_jax.metrics.convert`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: The pytorch-fid weights file this port loads (after conversion).
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: Leading hex digits of that file's SHA-256 (the torch.hub naming convention).
WEIGHTS_SHA256_PREFIX = "6726825d"
#: Environment variable naming the converted .npz file.
WEIGHTS_ENV = "SPD_JAX_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPSILON = 1e-3


def cache_dir() -> Path:
    """The spd_jax user cache directory: ``$SPD_JAX_CACHE`` or ``~/.cache/spd_jax``."""
    return Path(os.environ.get("SPD_JAX_CACHE", Path.home() / ".cache" / "spd_jax"))


def default_weights_path() -> Path:
    """Where the converted weights are looked for: ``$SPD_JAX_INCEPTION_WEIGHTS``, else
    ``<cache_dir>/pt_inception-2015-12-05-6726825d.npz``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else cache_dir() / (Path(WEIGHTS_FILE).stem + ".npz")


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics) and ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = tuple((p, p) for p in self.padding)
        x = nn.Conv(self.features, self.kernel_size, self.strides, pad, use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):
    """FIDInceptionA: 1x1, 5x5, double 3x3 and average-pool branches (pool excludes padding)."""

    pool_features: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (torchvision InceptionB)."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC: factorised 7x7 branches (pool excludes padding)."""

    channels_7x7: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (torchvision InceptionD)."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (average pool excluding padding) or, with ``max_pool``, FIDInceptionE_2."""

    max_pool: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to pool3: x (B, 299, 299, 3) in [-1, 1] -> features (B, 2048).

    Any input size >= 75 px is accepted; the FID protocol feeds 299x299 (see :func:`preprocess`).
    """

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        p = self.precision
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(False, p, name="Mixed_7b")(x)
        x = InceptionE(True, p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis (no antialiasing; source coordinates clamped at 0)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix.astype(np.float32)


def quantize(images: np.ndarray | jax.Array) -> jax.Array:
    """Model units [-1, 1] -> the 8-bit values a PNG would store, as float32 in [0, 255]."""
    return jnp.clip(jnp.round((jnp.asarray(images, jnp.float32) + 1.0) * 127.5), 0.0, 255.0)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """pytorch-fid's input pipeline: images (B, H, W, C in {1, 3}), model units -> (B, size, size, 3)
    in [-1, 1] (8-bit quantisation, bilinear resize, 2 x - 1)."""
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels; got shape {images.shape}")
    x = quantize(images) / 255.0
    rows = jnp.asarray(bilinear_matrix(images.shape[1], size))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], size))
    x = jnp.einsum("ph,bhwc,qw->bpqc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return 2.0 * x - 1.0


def load_variables(path: str | os.PathLike | None = None) -> dict:
    """Flax variables {"params", "batch_stats"} from a converted .npz (default
    :func:`default_weights_path`); raises FileNotFoundError with the conversion command."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.exists():
        raise FileNotFoundError(
            f"converted Inception weights not found at {path}. Convert pytorch-fid's {WEIGHTS_FILE} once "
            f"(torch not needed):\n  python -m spd_jax.metrics.convert /path/to/{WEIGHTS_FILE} {path}"
        )
    variables: dict = {}
    with np.load(path) as data:
        for name in data.files:
            if name.startswith("meta/"):
                continue
            node = variables
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(data[name])
    return variables


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """Callable images (N, H, W, C) in model units -> pool3 features (N, 2048) float32.

    Images go through the network in jitted batches of ``batch_size`` (the last one padded, so
    one compilation serves every call). ``precision`` is the convolution precision ("highest":
    full float32; "default" allows TF32 on recent GPUs, faster but not the reference numerics).
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, batch_size: int = 200,
                 precision: str = "highest"):
        self.weights_path = Path(weights) if weights is not None else default_weights_path()
        self.variables = load_variables(self.weights_path)
        with np.load(self.weights_path) as data:
            source = str(data["meta/source_sha256"]) if "meta/source_sha256" in data.files else "unknown"
        self.batch_size = int(batch_size)
        #: Describes the extractor in reports and reference-statistics cache keys.
        self.identity = f"pytorch-fid InceptionV3 pool3 (source sha256 {source[:16]}, precision={precision})"
        #: Whether the weights come from the pytorch-fid release file.
        self.official = source.startswith(WEIGHTS_SHA256_PREFIX)
        model = FIDInceptionV3(precision=jax.lax.Precision(precision))
        self._apply = jax.jit(lambda variables, images: model.apply(variables, preprocess(images)))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        return np.concatenate([self._batch(images[start : start + self.batch_size])
                               for start in range(0, len(images), self.batch_size)])

    def _batch(self, chunk: np.ndarray) -> np.ndarray:
        pad = self.batch_size - len(chunk)
        padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        return np.asarray(self._apply(self.variables, padded))[: len(chunk)]

