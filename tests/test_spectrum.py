"""Spectrum estimation, the official preset and the power-law fit."""

import numpy as np
import pytest

from spd_jax import data
from spd_jax.diffusion import bases, spectrum


def test_preset_values_match_the_official_constants():
    s = spectrum.power_law((32, 32, 3))
    assert s.shape == (32, 32, 3)
    np.testing.assert_allclose(s[0, 0, 0], 1.59 / 0.0086**2)
    np.testing.assert_allclose(s[0, 1, 0], 1.59 / 1.0086**2)
    np.testing.assert_allclose(s[16, 16, 0], 1.59 / (0.0086 + np.sqrt(512)) ** 2)
    assert (s > 1).sum() == 5 * 3  # docs/math.md §2.5: only 5 of 1024 frequencies have S > 1


@pytest.mark.parametrize("basis", ["dft", "dct"])
def test_estimate_of_white_noise_is_flat(basis):
    x = np.random.default_rng(0).uniform(-1, 1, size=(2000, 8, 8, 2))
    s = spectrum.estimate(x, basis)
    np.testing.assert_allclose(s, 1 / 3, rtol=0.1)  # Var U(-1, 1) = 1/3 at every frequency


def test_estimate_of_synthetic_gaussian_recovers_its_spectrum():
    target = spectrum.power_law((8, 8, 1), c1=0.5, c2=0.5, m=2)
    z = np.random.default_rng(1).normal(size=(4000, 8, 8, 1))
    x = bases.from_spectral_np(np.sqrt(target) * bases.to_spectral_np(z, "dft"), "dft")
    x = np.clip(x, -1, 1)
    np.testing.assert_allclose(spectrum.estimate(x), target, rtol=0.12)


def test_fit_recovers_power_law_parameters():
    s = spectrum.power_law((32, 32, 1), c1=3.0, c2=0.7, m=2.5)
    fit = spectrum.fit_power_law(s)
    np.testing.assert_allclose([fit.c1, fit.c2, fit.m], [3.0, 0.7, 2.5], rtol=0.05)


def test_patch_spectrum_is_a_natural_image_spectrum():
    """Embedded photo patches: power falls with |k| with an exponent near 2-3.5, even in k."""
    s = spectrum.estimate(data.load_patches("train", crops_per_photo=32))
    np.testing.assert_allclose(bases.mirror(s), s, rtol=1e-6)
    fit = spectrum.fit_power_law(s)
    assert 1.5 < fit.m < 4.0
    _, prof = spectrum.radial_profile(s)
    assert prof[1] > 10 * prof[-1]


def test_estimate_rejects_data_outside_model_units():
    with pytest.raises(ValueError, match=r"model units \[-1, 1\] for a spectrum estimate; got range \[0, 255\]"):
        spectrum.estimate(np.array([0.0, 255.0]).reshape(1, 1, 2, 1) * np.ones((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="1 non-finite values"):
        spectrum.estimate(np.array([0.0, np.nan, 0.5, -0.5]).reshape(1, 2, 2, 1))
    with pytest.raises(ValueError, match="c2 > 0"):
        spectrum.power_law((4, 4, 1), c2=0.0)
