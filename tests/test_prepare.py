"""spd_jax.prepare: TFDS's own builders run without TensorFlow from archives laid out like the
real downloads (cifar10, mnist, celeb_a); the prepared cifar10 reads back record for record, feeds
the input pipeline (float32, uint8 + device conversion, worker processes, exact resume), and
trains, resumes (data moved, reader threads changed), samples and evaluates through launch.py."""

import glob
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from spd_jax import data, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
NUM_TRAIN, NUM_TEST = 40, 16  # 5 batches of 8 + a test batch: "a few dozen" 32x32x3 images


def _run(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _fake_cifar10(seed=0):
    rng = np.random.default_rng(seed)
    n = NUM_TRAIN + NUM_TEST
    # smooth images (like photographs, so PNG does some work) with a random offset per image
    base = np.linspace(0, 200, 32)[None, :, None, None] + np.linspace(0, 50, 32)[None, None, :, None]
    images = np.clip(base + rng.integers(0, 56, (n, 1, 1, 3)) + rng.integers(0, 4, (n, 32, 32, 3)), 0, 255)
    return images.astype(np.uint8), rng.integers(0, 10, n)


def _binary_archive(path, images, labels):
    """The same images as ``cifar-10-binary.tar.gz`` (the file TFDS downloads)."""
    import tarfile

    def add(tar, name, payload):
        info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    per = NUM_TRAIN // 5
    parts = [(f"data_batch_{i + 1}.bin", slice(i * per, (i + 1) * per)) for i in range(5)]
    parts.append(("test_batch.bin", slice(NUM_TRAIN, None)))
    with tarfile.open(path, "w:gz") as tar:
        for name, rows in parts:
            chw = images[rows].transpose(0, 3, 1, 2).reshape(-1, 3072)
            add(tar, name, np.concatenate([labels[rows, None].astype(np.uint8), chw], axis=1).tobytes())
        add(tar, "batches.meta.txt", ("\n".join(prepare.CIFAR10_NAMES) + "\n\n").encode())


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(data_dir, images, labels, tmp) of a cifar10 prepared by the command from a fake
    cifar-10-python.tar.gz."""
    tmp = tmp_path_factory.mktemp("cifar")
    images, labels = _fake_cifar10()
    archive = tmp / "cifar-10-python.tar.gz"
    prepare.write_cifar10_python_archive(str(archive), images, labels, num_test=NUM_TEST)
    data_dir = tmp / "tfds"
    out = _run("-m", "spd_jax.prepare", "cifar10", f"--data_dir={data_dir}", f"--archive={archive}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"prepared cifar10 (test: {NUM_TEST}, train: {NUM_TRAIN})" in out.stdout
    return data_dir, images, labels, tmp


def test_prepared_cifar10_has_the_tfds_layout(cifar):
    data_dir = cifar[0]
    version = data_dir / "cifar10" / "3.0.2"
    assert sorted(os.listdir(version)) == [
        "cifar10-test.array_record-00000-of-00001", "cifar10-train.array_record-00000-of-00001",
        "dataset_info.json", "features.json", "label.labels.txt"]
    info = json.loads((version / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record" and info["name"] == "cifar10" and info["version"] == "3.0.2"
    assert {s["name"]: s["shardLengths"] for s in info["splits"]} == {"train": [str(NUM_TRAIN)],
                                                                       "test": [str(NUM_TEST)]}
    features = json.loads((version / "features.json").read_text())
    assert set(features["featuresDict"]["features"]) == {"id", "image", "label"}
    assert (version / "label.labels.txt").read_text().split() == list(prepare.CIFAR10_NAMES)


def test_data_source_reads_back_every_record(cifar):
    import tensorflow_datasets as tfds

    data_dir, images, labels, _ = cifar
    for split, offset, count in (("train", 0, NUM_TRAIN), ("test", NUM_TRAIN, NUM_TEST)):
        source = tfds.data_source("cifar10", split=split, data_dir=str(data_dir))
        assert len(source) == count
        seen = []
        for i in range(count):
            record = source[i]
            prefix, number = record["id"].decode().split("_")
            assert prefix == split
            row = offset + int(number)
            np.testing.assert_array_equal(record["image"], images[row])
            assert record["label"] == labels[row]
            seen.append(int(number))
        assert sorted(seen) == list(range(count))  # every record once, in TFDS's hashed order
    assert tfds.builder("cifar10", data_dir=str(data_dir)).info.features["label"].names == list(prepare.CIFAR10_NAMES)


def test_binary_archive_gives_the_same_records(cifar, tmp_path):
    data_dir, images, labels, _ = cifar
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _binary_archive(archive, images, labels)
    builder = prepare.prepare("cifar10", str(tmp_path / "tfds"), [str(archive)])
    for name in ("features.json", "label.labels.txt"):
        assert (data_dir / "cifar10" / "3.0.2" / name).read_bytes() == (builder.data_path / name).read_bytes(), name
    import tensorflow_datasets as tfds

    # record for record in the same order (the serialized protos may order their map entries
    # differently from one process to another, so the shard bytes are not compared)
    for split in ("train", "test"):
        ours = tfds.data_source("cifar10", split=split, data_dir=str(data_dir))
        theirs = tfds.data_source("cifar10", split=split, data_dir=str(tmp_path / "tfds"))
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert a["id"] == b["id"] and a["label"] == b["label"]
            np.testing.assert_array_equal(a["image"], b["image"])


def test_tensorflow_replacements_are_undone_after_preparing():
    from tensorflow_datasets.core import dataset_builder, shuffle
    from tensorflow_datasets.core.download import extractor
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import cifar

    before = (extractor.tf, shuffle.tf, cifar.tf, image_feature._ImageEncoder._encode_image,
              dataset_builder.importlib_resources)
    with prepare.without_tensorflow("tensorflow_datasets.image_classification.cifar"):
        assert extractor.tf is cifar.tf is prepare.TF_SHIM
    assert (extractor.tf, shuffle.tf, cifar.tf, image_feature._ImageEncoder._encode_image,
            dataset_builder.importlib_resources) == before


def test_pipeline_over_prepared_cifar10(cifar):
    """float32 (default) = uint8 + to_model_units_on_device, flips included; the stream and its
    resume do not depend on threads or worker processes."""
    import jax

    data_dir = str(cifar[0])
    source = data.image_source("cifar10", data_dir=data_dir)
    assert source[0].dtype == np.float32 and source[0].shape == (32, 32, 3)

    def take(it, n):
        return [next(it) for _ in range(n)]

    reference = take(iter(data.make_pipeline(source, batch_size=8, seed=3, flip=True)), 8)
    assert all(set(b) == {"image"} and b["image"].dtype == np.float32 for b in reference)
    as_uint8 = take(iter(data.make_pipeline(source, batch_size=8, seed=3, flip=True, uint8=True, num_threads=4)), 8)
    convert = jax.jit(data.to_model_units_on_device)
    for ref, raw in zip(reference, as_uint8, strict=True):
        assert raw["image"].dtype == np.uint8 and raw["flip"].dtype == bool
        np.testing.assert_array_equal(np.asarray(convert(raw)["image"]), ref["image"])
    assert 0 < sum(int(b["flip"].sum()) for b in as_uint8) < 64

    it = iter(data.make_pipeline(source, batch_size=8, seed=3, flip=True, worker_count=2, num_threads=1))
    try:
        first = take(it, 5)
        state = it.get_state()
    finally:
        it.close()
    assert state == {"next_index": 5}
    resumed = iter(data.make_pipeline(source, batch_size=8, seed=3, flip=True, num_threads=0, prefetch=1))
    resumed.set_state(state)
    for ref, got in zip(reference, first + take(resumed, 3), strict=True):
        np.testing.assert_array_equal(got["image"], ref["image"])


def _idx(path, magic, array):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_a_directory_of_the_four_files(tmp_path, monkeypatch):
    from tensorflow_datasets.image_classification import mnist

    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 12)  # the real files hold 60,000 and 10,000
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 4)
    rng = np.random.default_rng(1)
    files = tmp_path / "mnist_files"
    files.mkdir()
    expected = {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 4)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _idx(files / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        _idx(files / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
        expected[split] = (images, labels)
    prepare.prepare("mnist", str(tmp_path / "tfds"), [str(files)])
    import tensorflow_datasets as tfds

    for split, (images, labels) in expected.items():
        source = tfds.data_source("mnist", split=split, data_dir=str(tmp_path / "tfds"))
        got = sorted((int(r["label"]), r["image"][..., 0].tobytes()) for r in (source[i] for i in range(len(source))))
        assert got == sorted((int(lab), img.astype(np.uint8).tobytes()) for img, lab in zip(images, labels, strict=True))
    batch = next(iter(data.make_pipeline(data.image_source("mnist", data_dir=str(tmp_path / "tfds")), batch_size=4,
                                         seed=0)))
    assert batch["image"].shape == (4, 28, 28, 1)


def test_celeb_a_from_a_directory_of_the_drive_files(tmp_path):
    from PIL import Image
    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as celeb

    rng = np.random.default_rng(2)
    files = tmp_path / "celeba_files"
    files.mkdir()
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    with zipfile.ZipFile(files / "img_align_celeba.zip", "w") as z:
        for name in names:
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(out, format="JPEG")
            z.writestr(f"img_align_celeba/{name}", out.getvalue())
    (files / "list_eval_partition.txt").write_text("".join(f"{n} {i % 3}\n" for i, n in enumerate(names)))

    def table(headings, values):
        rows = "".join(f"{n} {' '.join(map(str, v))}\n" for n, v in zip(names, values, strict=True))
        return f"{len(names)}\n{' '.join(headings)}\n{rows}"

    (files / "list_attr_celeba.txt").write_text(table(celeb.ATTR_HEADINGS, rng.choice([-1, 1], (6, 40))))
    (files / "list_landmarks_align_celeba.txt").write_text(table(celeb.LANDMARK_HEADINGS, rng.integers(0, 99, (6, 10))))
    (files / "identity_CelebA.txt").write_text("".join(f"{n} {i + 100}\n" for i, n in enumerate(names)))
    builder = prepare.prepare("celeb_a", str(tmp_path / "tfds"), [str(files)])
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2, "validation": 2, "test": 2}
    source = data.image_source("celeb_a", data_dir=str(tmp_path / "tfds"), image_size=64)
    assert len(source) == 2 and source[0].shape == (64, 64, 3)


def test_svhn_cropped_from_a_directory_of_the_mat_files(tmp_path):
    import scipy.io

    rng = np.random.default_rng(3)
    files = tmp_path / "svhn_files"
    files.mkdir()
    for split, n in (("train", 6), ("test", 3), ("extra", 2)):
        scipy.io.savemat(files / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                                         "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    builder = prepare.prepare("svhn_cropped", str(tmp_path / "tfds"), [str(files)])
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 3, "extra": 2}
    source = data.image_source("svhn_cropped", data_dir=str(tmp_path / "tfds"))
    assert len(source) == 6 and source[0].shape == (32, 32, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["cifar1", "--data_dir=D"], "error: dataset 'cifar1' (did you mean 'cifar10'?)"),
        (["mnist", "--data_dir=D", "--archive=A"], "error: mnist: --archive has no train-images-idx3-ubyte.gz"),
        (["cifar10", "--data_dir=D", "--archive=missing.tar.gz"], "error: --archive"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "A").mkdir()
    args = [a.replace("=D", f"={tmp_path / 'D'}").replace("=A", f"={tmp_path / 'A'}")
            .replace("=missing", f"={tmp_path}/missing") for a in args]
    out = _run("-m", "spd_jax.prepare", *args, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


#: overrides of configs/cifar10_spd.py that make the run tiny (cf. tests/test_train.py tiny())
TINY = [
    "--config.process.spectrum_images=32",
    "--config.model.base_channels=8", "--config.model.channel_mult=(1,)", "--config.model.num_res_blocks=1",
    "--config.model.attention_resolutions=()", "--config.model.mid_attention=False",
    "--config.model.head_channels=0", "--config.model.num_heads=1", "--config.model.dropout=0.0",
    "--config.train.batch_size=8", "--config.train.steps_per_dispatch=1", "--config.train.log_every=1",
    "--config.train.checkpoint_every=1", "--config.train.sample_every=0", "--config.train.fast_compile=True",
    "--config.optim.warmup_steps=0",
    "--config.sample.nfe=3", "--config.sample.grid_images=4", "--config.sample.num_samples=4",
    "--config.sample.batch_size=4",
]


def _launch(workdir, data_dir, *extra):
    return _run("launch.py", "--config=configs/cifar10_spd.py", f"--workdir={workdir}",
                f"--config.data.tfds_data_dir={data_dir}", *TINY, *extra)


def _steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "*"))
                  if os.path.basename(p).isdigit())


def test_cifar10_spd_trains_resumes_samples_and_evaluates_through_launch(cifar):
    data_dir, _, _, tmp = cifar
    workdir, first, moved = tmp / "run", tmp / "train_tfds", tmp / "moved_tfds"
    shutil.copytree(data_dir, first)
    out = _launch(workdir, first, "--config.train.num_steps=2", "--config.data.num_threads=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(workdir)[-1] == 2

    shutil.move(first, moved)  # the data moves, reader threads and uint8 delivery change: run-only settings
    out = _launch(workdir, moved, "--config.train.num_steps=4", "--config.data.num_threads=3",
                  "--config.data.uint8=True")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and _steps(workdir)[-1] == 4

    out = _launch(workdir, moved, "--mode=sample")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples written to" in out.stdout
    written = out.stdout.split("samples written to ")[1].split(" (and .png)")[0].strip()
    assert os.path.exists(written), out.stdout

    out = _launch(workdir, moved, "--mode=eval", "--config.eval.metrics=pixel_fd,swd",
                  "--config.eval.settings=ddim:2", "--config.eval.num_samples=8", "--config.eval.batch_size=4",
                  "--config.eval.grid_images=4", "--config.eval.name=tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((workdir / "eval" / "tiny" / "report.json").read_text())
    assert report["description"]["dataset"] == "cifar10" and report["description"]["checkpoint_step"] == 4
    assert report["protocol"]["reference"] == {"name": "cifar10/test", "num_images": NUM_TEST}
    assert np.isfinite(report["settings"][0]["metrics"]["pixel_fd"])
