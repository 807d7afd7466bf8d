"""Training pipelines: deterministic shuffling and flips, exact resume, per-process sharding,
and a clear error for an unprepared TFDS dataset."""

import numpy as np
import pytest

from spd_jax import data


def _take(iterator, count):
    return [next(iterator)["image"] for _ in range(count)]


def test_pipeline_yields_local_batches_in_model_units():
    source = data.image_source("digits")
    batch = next(iter(data.make_pipeline(source, batch_size=16, seed=0)))
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_epochs_are_reshuffled_and_cover_the_data():
    source = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1) / 16  # in [-1, 1], exact in float32
    stream = np.concatenate(_take(iter(data.make_pipeline(source, batch_size=4, seed=3)), 6)).ravel() * 16
    first, second = stream[:12], stream[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert not np.array_equal(first, second)


def test_iterator_state_resumes_the_stream_exactly():
    source = data.image_source("digits")
    pipeline = data.make_pipeline(source, batch_size=8, seed=1, flip=True)
    it = iter(pipeline)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(data.make_pipeline(source, batch_size=8, seed=1, flip=True))
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3), strict=True):
        np.testing.assert_array_equal(a, b)


def test_process_shards_concatenate_to_the_single_process_stream():
    source = data.image_source("digits")
    whole = _take(iter(data.make_pipeline(source, batch_size=12, seed=2, flip=True)), 3)
    shards = [
        _take(iter(data.make_pipeline(source, batch_size=4, seed=2, flip=True, process_index=p, process_count=3)), 3)
        for p in range(3)
    ]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([shards[p][b] for p in range(3)]), whole[b])


def test_flips_mirror_about_half_of_the_images():
    source = np.tile(np.linspace(-1, 1, 8, dtype=np.float32)[None, None, :, None], (64, 8, 1, 1))
    images = next(iter(data.make_pipeline(source, batch_size=64, seed=0, flip=True)))["image"]
    flipped = images[:, 0, 0, 0] > 0
    assert 16 < flipped.sum() < 48
    np.testing.assert_array_equal(images[flipped], source[: flipped.sum(), :, ::-1])


def test_spectrum_images_include_mirrors_when_training_flips():
    source = data.image_source("digits")
    images = data.spectrum_images(source, 10, flip=True)
    assert images.shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(images[10:], images[:10, :, ::-1])


def test_missing_tfds_dataset_names_the_preparation_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.image_source("cifar10", data_dir=str(tmp_path))
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in str(err.value)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        data.image_source("cifar1")


def test_tfds_images_are_converted_cropped_and_resized():
    image = np.full((218, 178, 3), 255, np.uint8)
    out = data.to_model_units(image, size=64, center_crop=data.CELEBA_CROP)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)
    gray = data.to_model_units(np.zeros((28, 28), np.uint8))
    assert gray.shape == (28, 28, 1) and gray.min() == -1.0
