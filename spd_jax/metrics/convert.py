"""Convert pytorch-fid's Inception weights to the .npz that :mod:`spd_jax.metrics.inception` loads.

Run once (torch is optional)::

    python -m spd_jax.metrics.convert /path/to/pt_inception-2015-12-05-6726825d.pth [OUT.npz]

OUT defaults to :func:`spd_jax.metrics.inception.default_weights_path`. The .pth is read with
``torch.load`` when torch is installed, otherwise with a small restricted unpickler that
understands both PyTorch formats: the zip archive (``data.pkl`` + one raw record per storage,
torch >= 1.6) and the legacy stream (magic number, protocol and system pickles, the object
pickle, the storage-key list, then each storage as an int64 element count and raw bytes). Only
plain containers, tensors and storages are accepted, so no code from the file is executed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.metrics import inception

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
READERS = ("auto", "torch", "pickle")


class _Storage:
    """A storage named in the pickle; its bytes are attached after unpickling."""

    def __init__(self, dtype: np.dtype, key: str, offset: int = 0):
        self.dtype, self.key, self.offset = np.dtype(dtype), key, offset


class _Tensor:
    """A tensor view (storage, element offset, size, stride) awaiting its storage bytes."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        flat = buffers[self.storage.key][self.storage.offset + self.offset :]
        strides = tuple(s * flat.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(flat, self.size, strides).astype(flat.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Unpickler for torch.save files that admits only tensors, storages and plain containers."""

    def __init__(self, file, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor, storage or container")

    def persistent_load(self, pid):
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"unsupported storage type {dtype!r}")
        root = self.storages.setdefault(key, _Storage(dtype, key))
        view = pid[5] if self.legacy else None
        return root if view is None else _Storage(dtype, key, offset=view[1])


def _materialise(obj, buffers: dict[str, np.ndarray]):
    if isinstance(obj, _Tensor):
        return obj.to_numpy(buffers)
    if isinstance(obj, dict):
        return {k: _materialise(v, buffers) for k, v in obj.items()}
    return obj


def _read_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        names = set(archive.namelist())
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        unpickler = _Unpickler(io.BytesIO(archive.read(pkl)), legacy=False)
        result = unpickler.load()
        endian = "<" if order == "little" else ">"
        buffers = {
            key: np.frombuffer(archive.read(f"{prefix}data/{key}"), storage.dtype.newbyteorder(endian))
            for key, storage in unpickler.storages.items()
        }
    return _materialise(result, buffers)


def _read_legacy(path: Path) -> dict:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC or pickle.load(f) != _LEGACY_PROTOCOL:
            raise ValueError(f"{path} is neither a PyTorch zip archive nor a legacy torch.save file")
        sys_info = pickle.load(f)
        endian = "<" if sys_info.get("little_endian", True) else ">"
        unpickler = _Unpickler(f, legacy=True)
        result = unpickler.load()
        buffers = {}
        for key in pickle.load(f):
            storage = unpickler.storages[str(key)]
            (count,) = struct.unpack(endian + "q", f.read(8))
            dtype = storage.dtype.newbyteorder(endian)
            buffers[str(key)] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    return _materialise(result, buffers)


def read_state_dict(path: str | os.PathLike, *, reader: str = "auto") -> dict[str, np.ndarray]:
    """A PyTorch state dict file as {name: numpy array}.

    ``reader``: "torch" (``torch.load``), "pickle" (the built-in torch-free reader) or "auto"
    (torch if importable, else pickle).
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}; got {reader!r}")
    path = Path(path)
    if reader == "torch" or (reader == "auto" and _torch_available()):
        import torch

        return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "collection/module/.../leaf" -> shape of the Flax FID InceptionV3 variables."""
    model = inception.FIDInceptionV3()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE,
                                                                      inception.INPUT_SIZE, 3)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_name(flax_name: str) -> str:
    collection, *modules, leaf = flax_name.split("/")
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict entries the pool3 network needs, with their PyTorch shapes
    (convolutions (O, I, kh, kw)); the fc layer and ``num_batches_tracked`` are not needed."""
    shapes = {}
    for name, shape in _flax_shapes().items():
        shapes[_torch_name(name)] = (shape[3], shape[2], shape[0], shape[1]) if name.endswith("kernel") else shape
    return shapes


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid state dict -> flat Flax variables {"params/Mixed_5b/branch1x1/conv/kernel": ...}
    (float32; convolution kernels transposed (O, I, kh, kw) -> (kh, kw, I, O)).

    Raises KeyError for missing entries and ValueError for wrong shapes.
    """
    expected = _flax_shapes()
    missing = [_torch_name(n) for n in expected if _torch_name(n) not in state_dict]
    if missing:
        raise KeyError(f"{len(missing)} Inception entries missing from the state dict, e.g. {missing[:3]}")
    out = {}
    for name, shape in expected.items():
        value = np.asarray(state_dict[_torch_name(name)], np.float32)
        if name.endswith("kernel"):
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape:
            raise ValueError(f"{_torch_name(name)}: expected shape {shape} after conversion, got {value.shape}")
        out[name] = value
    return out


def convert(source: str | os.PathLike, target: str | os.PathLike | None = None, *,
            reader: str = "auto") -> Path:
    """Read ``source`` (.pth), convert, write ``target`` (.npz, default
    :func:`~spd_jax.metrics.inception.default_weights_path`) with the source's SHA-256 stored
    under ``meta/source_sha256``; returns the target path."""
    target = Path(target) if target is not None else inception.default_weights_path()
    variables = convert_state_dict(read_state_dict(source, reader=reader))
    variables["meta/source_sha256"] = np.array(inception.file_sha256(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez(tmp, **variables)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=f"pytorch-fid weights ({inception.WEIGHTS_FILE})")
    parser.add_argument("target", nargs="?", default=None, help="output .npz (default: the user cache)")
    parser.add_argument("--reader", choices=READERS, default="auto")
    args = parser.parse_args(argv)
    target = convert(args.source, args.target, reader=args.reader)
    digest = str(np.load(target)["meta/source_sha256"])
    print(f"wrote {target} (source sha256 {digest})")
    if not digest.startswith(inception.WEIGHTS_SHA256_PREFIX):
        print(f"warning: {args.source} is not the pytorch-fid release (sha256 should start with "
              f"{inception.WEIGHTS_SHA256_PREFIX}); FIDs computed with it are not comparable", file=sys.stderr)


if __name__ == "__main__":
    main()
