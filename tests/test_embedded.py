"""The embedded data sets need no download and have fixed, disjoint splits."""

import numpy as np
import pytest

from spd_jax import data


def test_digits_scaling_and_split():
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.shape[1:] == (8, 8, 1) and len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 1
    assert train.min() == -1.0 and train.max() == 1.0  # x/8 - 1 maps 0..16 onto [-1, 1]
    np.testing.assert_array_equal(data.load_digits("test"), test)  # fixed seed
    images, labels = data.load_digits("test", with_labels=True)
    np.testing.assert_array_equal(images, test)
    assert set(labels) == set(range(10))


def test_patches_are_disjoint_by_region():
    test = data.load_patches("test")
    train = data.load_patches("train", crops_per_photo=8)
    assert test.shape[1:] == (32, 32, 3) and train.shape == (8 * len(data.PHOTOS), 32, 32, 3)
    assert -1.0 <= train.min() and train.max() <= 1.0
    np.testing.assert_array_equal(data.load_patches("test"), test)
    flat_train = {p.tobytes() for p in train}
    assert not any(p.tobytes() in flat_train for p in test)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="did you mean 'test'"):
        data.load_digits("tset")
    with pytest.raises(ValueError, match="unknown embedded dataset 'cifar10'"):
        data.load_embedded("cifar10")
