"""Prepare a TFDS image dataset in array_record format without TensorFlow.

    python -m spd_jax.prepare cifar10 --data_dir=D [--archive=PATH]

runs TFDS's own builder for the dataset (``tfds.builder(NAME).download_and_prepare``), so it
writes the files ``tfds build NAME --file_format=array_record`` writes: the same feature spec
(``features.json``), ``dataset_info.json``, label files and shards named
``NAME-SPLIT.array_record-0000X-of-0000Y``, holding the same records (same decoded images,
labels and ids) in the same (hashed) order. Only the builder's TensorFlow calls are replaced
while it runs, by the standard library and PIL:

* ``tf.io.gfile`` (reading the downloaded files, archive extraction, the shuffler's temporary
  buckets) by ``open`` through ``etils.epath``;
* ``tf.compat.as_text`` (archive member names) by ``bytes.decode``;
* PNG / JPEG encoding of image features (``tf.image.encode_png``) by PIL. The encoded bytes may
  differ from TensorFlow's, the decoded pixels are the same;
* ``importlib_resources`` (needed by TFDS on every Python version, though it only declares it
  for Python < 3.9) by the standard ``importlib.resources``.

Sources: with ``--archive`` the files the user downloaded (no network is used); without it TFDS's
own download step fetches them (and checks their registered checksums). ``--archive`` is

* cifar10: ``cifar-10-python.tar.gz`` (the pickled batches most people download) or
  ``cifar-10-binary.tar.gz`` (the file TFDS downloads); both give the same records;
* mnist, fashion_mnist: a directory with the four ``*-ubyte.gz`` files;
* svhn_cropped: a directory with ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``;
* celeb_a: a directory with ``img_align_celeba.zip``, ``list_eval_partition.txt``,
  ``list_attr_celeba.txt``, ``list_landmarks_align_celeba.txt`` and ``identity_CelebA.txt``
  (the files of the CelebA Google Drive folder; TFDS's own download of them from Google Drive is
  often refused for quota, so the directory is the reliable route).

``--archive`` may also name several files (repeat the flag). Re-running on a prepared data_dir
does nothing; ``--overwrite`` prepares again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.resources
import importlib.resources.abc
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import types

import numpy as np

#: datasets this command prepares (those spd_jax trains on)
DATASETS = ("cifar10", "mnist", "fashion_mnist", "svhn_cropped", "celeb_a")

#: file name the user has for each download URL that does not end with it (CelebA's Drive ids)
_CELEBA_FILES = {
    "IMG_ALIGNED_DATA": "img_align_celeba.zip",
    "EVAL_LIST": "list_eval_partition.txt",
    "LANDMARKS_DATA": "list_landmarks_align_celeba.txt",
    "ATTR_DATA": "list_attr_celeba.txt",
    "IDENTITY_DATA": "identity_CelebA.txt",
}
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class PrepareError(Exception):
    """A user-facing problem (missing file, unknown dataset): printed as one ``error:`` line."""


# ---------------------------------------------------------------------------------------------
# TensorFlow's calls, replaced
# ---------------------------------------------------------------------------------------------


def _as_text(value, encoding: str = "utf-8") -> str:
    return value.decode(encoding) if isinstance(value, bytes) else value


class _ReadFile:
    """A file opened for reading that, like ``tf.io.gfile.GFile``, stays usable after ``close()``
    (the next read reopens it at the same position): TFDS's CelebA builder reads the members of
    ``img_align_celeba.zip`` after the archive's file was closed."""

    def __init__(self, path, mode: str):
        self.name, self.mode = os.fspath(path), mode
        self._file, self._pos = None, 0

    def _open(self):
        if self._file is None:
            self._file = open(self.name, self.mode)  # noqa: SIM115 - closed by close()
            self._file.seek(self._pos)
        return self._file

    def read(self, size: int = -1):
        return self._open().read(size)

    def readline(self, size: int = -1):
        return self._open().readline(size)

    def __iter__(self):
        return iter(self._open())

    def seek(self, offset: int, whence: int = 0):
        return self._open().seek(offset, whence)

    def tell(self) -> int:
        return self._open().tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        if self._file is not None:
            self._pos = self._file.tell()
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._open(), name)


def _gfile_open(path, mode: str = "r"):
    if "r" in mode and "+" not in mode:
        return _ReadFile(path, mode)
    from etils import epath

    return epath.Path(path).open(mode)


def _gfile_copy(src, dst, overwrite: bool = False):
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(dst)
    shutil.copyfile(src, dst)


class _TFError(OSError):
    """Stands in for tf.errors.* in ``except`` clauses (never raised by the replacements)."""


#: the parts of the ``tensorflow`` module that TFDS's builders, extractor and shuffler call
TF_SHIM = types.SimpleNamespace(
    compat=types.SimpleNamespace(as_text=_as_text),
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(
            GFile=_gfile_open,
            exists=os.path.exists,
            remove=os.remove,
            copy=_gfile_copy,
            makedirs=lambda path: os.makedirs(path, exist_ok=True),
        )
    ),
    errors=types.SimpleNamespace(
        ResourceExhaustedError=_TFError, UnimplementedError=_TFError, NotFoundError=_TFError
    ),
)


def encode_image(np_image: np.ndarray, encoding_format: str = "png") -> bytes:
    """uint8 (H, W, C) with C in 1, 3, 4 -> PNG or JPEG bytes, with PIL (TFDS uses tf.image)."""
    from PIL import Image

    image = np.asarray(np_image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    out = io.BytesIO()
    Image.fromarray(image).save(out, format={"png": "PNG", "jpeg": "JPEG"}[encoding_format.lower()])
    return out.getvalue()


def _pil_encode_image(self, np_image: np.ndarray) -> bytes:
    """Replacement of tfds's ``_ImageEncoder._encode_image`` (same validation, PIL encoding)."""
    from tensorflow_datasets.core.features import image_feature

    image_feature._validate_np_array(np_image, shape=self.shape, dtype=self.np_dtype)
    return encode_image(np_image, self.encoding_format)


#: modules of TFDS whose global ``tf`` is used on the preparation path (the builder's own
#: module is added by :func:`without_tensorflow`)
_TF_MODULES = (
    "tensorflow_datasets.core.download.extractor",
    "tensorflow_datasets.core.download.downloader",
    "tensorflow_datasets.core.shuffle",
)


@contextlib.contextmanager
def without_tensorflow(builder_module: str | None = None):
    """While active, TFDS's preparation path runs on the standard library and PIL (see the
    module docstring). Everything is restored on exit."""
    from tensorflow_datasets.core import dataset_builder
    from tensorflow_datasets.core.features import image_feature

    saved = []

    def replace(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    modules = list(_TF_MODULES) + ([builder_module] if builder_module else [])
    try:
        for name in modules:
            module = importlib.import_module(name)
            if "tf" in vars(module):
                replace(module, "tf", TF_SHIM)
        replace(dataset_builder, "importlib_resources", importlib.resources)
        replace(image_feature._ImageEncoder, "_encode_image", _pil_encode_image)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# local files in place of downloads
# ---------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts of lists, bytes and numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy") and name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        if module == "numpy":
            return getattr(np, name)
        return super().find_class(module, name)


def _key(d: dict, name: str):
    return d[name.encode()] if name.encode() in d else d[name]


def read_cifar10_python_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 (N,), images uint8 (N, 3072) channel-major) of one pickled CIFAR-10 batch."""
    batch = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(_key(batch, "data"), np.uint8).reshape(-1, 3 * 32 * 32)
    labels = np.asarray(_key(batch, "labels"), np.uint8)
    if len(labels) != len(images):
        raise PrepareError(f"a CIFAR-10 batch has {len(labels)} labels for {len(images)} images")
    return labels, images


def cifar10_python_to_binary(archive: str, out_dir: str) -> str:
    """Rewrite ``cifar-10-python.tar.gz`` as the ``cifar-10-batches-bin/`` directory of
    ``cifar-10-binary.tar.gz`` (one label byte + 3072 image bytes per record, same order, and
    ``batches.meta.txt``); returns ``out_dir``, which then holds ``cifar-10-batches-bin/``."""
    target = os.path.join(out_dir, "cifar-10-batches-bin")
    os.makedirs(target, exist_ok=True)
    wanted = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    found = set()
    with tarfile.open(archive) as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if not member.isfile() or base not in wanted:
                continue
            raw = tar.extractfile(member).read()
            found.add(base)
            if base == "batches.meta":
                meta = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
                names = [_as_text(n) for n in _key(meta, "label_names")]
                with open(os.path.join(target, "batches.meta.txt"), "w") as f:
                    f.write("\n".join(names) + "\n\n")
                continue
            labels, images = read_cifar10_python_batch(raw)
            records = np.concatenate([labels[:, None], images], axis=1)
            with open(os.path.join(target, base + ".bin"), "wb") as f:
                f.write(records.tobytes())
    missing = sorted(wanted - found)
    if missing:
        raise PrepareError(f"{archive} is not cifar-10-python.tar.gz: it lacks {', '.join(missing)}")
    return out_dir


def _archive_kind(path: str) -> str:
    """'python' or 'binary' for a CIFAR-10 tar archive."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if "cifar-10-batches-py" in member.name:
                    return "python"
                if "cifar-10-batches-bin" in member.name:
                    return "binary"
    except tarfile.TarError as err:
        raise PrepareError(f"{path} is not a readable tar archive: {err}") from None
    raise PrepareError(f"{path} holds neither cifar-10-batches-py/ nor cifar-10-batches-bin/")


def _url_file_names(builder) -> dict[str, str]:
    """URL -> the file name a user who downloaded it has, for URLs not ending with it."""
    module = sys.modules[type(builder).__module__]
    return {getattr(module, k): v for k, v in _CELEBA_FILES.items() if isinstance(getattr(module, k, None), str)}


class LocalFiles:
    """Maps the builder's download URLs to the user's files (``--archive``: files or directories)."""

    def __init__(self, paths, names: dict[str, str], dataset: str):
        self._files = {}
        for path in paths:
            path = os.path.abspath(os.path.expanduser(path))
            if os.path.isdir(path):
                for entry in sorted(os.listdir(path)):
                    self._files.setdefault(entry, os.path.join(path, entry))
            elif os.path.isfile(path):
                self._files[os.path.basename(path)] = path
            else:
                raise PrepareError(f"--archive {path} does not exist")
        self._names = names
        self._dataset = dataset

    def expected(self, url: str) -> str:
        from urllib.parse import urlparse

        return self._names.get(url) or os.path.basename(urlparse(url).path)

    def resolve(self, url) -> str:
        url = getattr(url, "url", url)
        name = self.expected(url)
        if name in self._files:
            return self._files[name]
        if self._dataset == "cifar10" and len(self._files) == 1:  # any name: the content decides
            return next(iter(self._files.values()))
        raise PrepareError(f"{self._dataset}: --archive has no {name} (downloaded from {url}); "
                           f"found {sorted(self._files) or 'nothing'}")


def _map_tree(fn, tree):
    if isinstance(tree, dict):
        return {k: _map_tree(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(fn, v) for v in tree)
    return fn(tree)


def _use_local_files(dl_manager, local: LocalFiles, dataset: str, scratch: str):
    """Make ``dl_manager`` return the user's files instead of downloading (extraction is TFDS's)."""

    def download(url_or_urls):
        from etils import epath

        return _map_tree(lambda u: epath.Path(local.resolve(u)), url_or_urls)

    def download_and_extract(url_or_urls):
        from etils import epath

        if dataset == "cifar10":
            path = local.resolve(url_or_urls)
            if _archive_kind(path) == "python":
                return epath.Path(cifar10_python_to_binary(path, os.path.join(scratch, "cifar10_bin")))
        return dl_manager.extract(download(url_or_urls))

    dl_manager.download = download
    dl_manager.download_and_extract = download_and_extract
    return dl_manager


def write_cifar10_python_archive(path: str, images: np.ndarray, labels: np.ndarray,
                                  num_test: int) -> None:
    """Write ``images`` uint8 (N, 32, 32, 3) and ``labels`` as a ``cifar-10-python.tar.gz``
    laid out like the real one (for tests and benchmarks): the last ``num_test`` images are
    ``test_batch``, the others split evenly over ``data_batch_1..5``, plus ``batches.meta``;
    pickles with bytes keys and channel-major (N, 3072) uint8 rows, as in the real archive."""
    images = np.asarray(images, np.uint8)
    labels = np.asarray(labels)
    train, test = images[: len(images) - num_test], images[len(images) - num_test :]
    if len(train) % 5:
        raise ValueError(f"{len(train)} training images do not split into 5 batches")
    rows = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731 - HWC -> CHW rows
    per = len(train) // 5
    batches = [(f"data_batch_{i + 1}", train[i * per : (i + 1) * per], labels[i * per : (i + 1) * per])
               for i in range(5)]
    batches.append(("test_batch", test, labels[len(train) :]))

    def add(tar, name, payload):
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, x, y in batches:
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows(x),
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(len(x))]}
            add(tar, name, pickle.dumps(batch, protocol=2))
        meta = {b"num_cases_per_batch": per, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
        add(tar, "batches.meta", pickle.dumps(meta, protocol=2))
        add(tar, "readme.html", b"<html>CIFAR-10</html>")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def prepare(name: str, data_dir: str, archives=(), overwrite: bool = False, download_dir: str | None = None):
    """Prepare TFDS dataset ``name`` under ``data_dir`` in array_record format without TensorFlow;
    returns the builder (``builder.data_dir`` holds the files)."""
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PrepareError(f"dataset {name!r}{hint}: expected one of {', '.join(DATASETS)}")
    import tensorflow_datasets as tfds

    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    fmt = builder.info.file_format
    if builder.is_prepared() and not overwrite:
        if getattr(fmt, "value", fmt) != "array_record":
            raise PrepareError(f"{builder.data_dir} holds {name} in {getattr(fmt, 'value', fmt)} format; "
                               "pass --overwrite to prepare it again in array_record format")
        print(f"{name} is already prepared in {builder.data_dir}")
        return builder
    mode = tfds.download.GenerateMode
    config = tfds.download.DownloadConfig(
        try_download_gcs=False,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
    )
    with contextlib.ExitStack() as stack:
        if archives:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"spd_jax_prepare_{name}_",
                                                                      dir=download_dir or data_dir))
            local = LocalFiles(archives, _url_file_names(builder), name)
            make = builder._make_download_manager

            def make_local(**kwargs):
                kwargs["download_dir"] = os.path.join(scratch, "downloads")
                return _use_local_files(make(**kwargs), local, name, scratch)

            builder._make_download_manager = make_local
        stack.enter_context(without_tensorflow(type(builder).__module__))
        try:
            builder.download_and_prepare(download_dir=download_dir, download_config=config,
                                         file_format="array_record")
        except Exception as err:  # noqa: BLE001 - a failed download becomes one error line
            if archives or not _is_network_error(err):
                raise
            raise PrepareError(
                f"could not download the {name} files ({_first_line(err)}). Download them where there "
                f"is internet and pass them with --archive (see python -m spd_jax.prepare --help)"
            ) from None
    return builder


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) comes from a failed download."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__ or ""
        if module.startswith(("requests", "urllib3", "urllib.error", "socket")) or "download" in module:
            return True
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spd_jax.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help=f"dataset: {', '.join(DATASETS)}")
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write (config.data.tfds_data_dir)")
    parser.add_argument("--archive", action="append", default=[],
                        help="downloaded archive, file or directory of files (repeatable); "
                             "omit to download with TFDS")
    parser.add_argument("--download_dir", default=None,
                        help="where downloads / scratch files go (default DATA_DIR/downloads)")
    parser.add_argument("--overwrite", action="store_true", help="prepare again if already prepared")
    args = parser.parse_args(argv)
    try:
        builder = prepare(args.name, args.data_dir, args.archive, args.overwrite, args.download_dir)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"prepared {args.name} ({splits}) in {builder.data_dir}")
    print(f"train with --config.data.name={args.name} --config.data.tfds_data_dir={os.path.abspath(args.data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
