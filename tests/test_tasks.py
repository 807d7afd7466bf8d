"""Degradation operators, masks, known-pixel projection and the scikit-image metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spd_jax import tasks
from spd_jax.diffusion import processes, spectrum


@given(value=st.floats(-1, 1), factor=st.sampled_from([2, 4]))
def test_downsampling_a_constant_image_is_constant(value, factor):
    x = jnp.full((2, 8, 8, 3), value, jnp.float32)
    d = tasks.degrade(tasks.Task("sr", factor=factor), x, jax.random.key(0))
    low, cond = tasks.area_downsample(x, factor), d.cond
    assert cond.shape == x.shape
    assert low.shape == (2, 8 // factor, 8 // factor, 3)
    np.testing.assert_allclose(low, value, atol=1e-6)
    np.testing.assert_allclose(cond, value, atol=1e-5)


def test_area_downsampling_is_the_block_mean():
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
    low = tasks.area_downsample(x, 2)
    np.testing.assert_allclose(low[0, 1, 0, 0], x[0, 2:4, 0:2, 0].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="divide H=4"):
        tasks.area_downsample(x, 3)


@pytest.mark.parametrize("make", [tasks.box_masks, tasks.free_form_masks])
def test_masks_keep_exactly_the_known_pixels(make):
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    mask = make(jax.random.key(2), x.shape)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert 0.05 < float(1 - mask.mean()) < 0.95  # holes are neither empty nor everything
    cond = tasks.inpainting_condition(x, mask)
    known = np.broadcast_to(np.asarray(mask) > 0.5, x.shape)
    np.testing.assert_array_equal(np.asarray(cond[..., :3])[known], np.asarray(x)[known])
    np.testing.assert_array_equal(np.asarray(cond[..., :3])[~known], 0.0)
    # per-example randomness: a sub-batch with its global indices reproduces the same masks
    tail = make(jax.random.key(2), (2,) + x.shape[1:], index=jnp.arange(2, 4))
    np.testing.assert_array_equal(tail, mask[2:])


@pytest.mark.parametrize("name", ["ddm_constant", "spd"])
def test_known_pixel_projection_leaves_known_pixels_bit_identical_at_zero_noise(name):
    shape = (8, 8, 3)
    proc = processes.make(name, spectrum=spectrum.power_law(shape)) if name == "spd" else processes.make(name)
    y = jax.random.uniform(jax.random.key(3), (2,) + shape, minval=-1, maxval=1)
    mask = tasks.box_masks(jax.random.key(4), y.shape)
    project = tasks.known_pixel_projection(proc, y, mask)
    x = jax.random.normal(jax.random.key(5), y.shape)
    out = jax.jit(project)(x, 0.0, jax.random.key(6), 3)
    known = np.broadcast_to(np.asarray(mask) > 0.5, y.shape)
    if proc.is_scalar:
        np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(y)[known])
    else:  # through the DFT round trip: equal to float32 round-off
        np.testing.assert_allclose(np.asarray(out)[known], np.asarray(y)[known], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[~known], np.asarray(x)[~known])
    noisy = project(x, 0.5, jax.random.key(6), 3)
    assert float(jnp.std((noisy - y)[known.nonzero()])) > 0.1  # known pixels are re-noised at s > 0


def test_metrics_match_definitions():
    ref = np.zeros((2, 8, 8, 1))
    est = ref + 0.1
    np.testing.assert_allclose(tasks.psnr(ref, est), 10 * np.log10(4 / 0.01), rtol=1e-6)
    np.testing.assert_allclose(tasks.ssim(ref + 0.3, ref + 0.3), 1.0)
    assert np.all(tasks.ssim(ref, np.random.default_rng(0).uniform(-1, 1, ref.shape)) < 0.2)


def test_mean_fill_baseline_fills_holes_with_the_known_mean():
    x = jnp.concatenate([jnp.ones((1, 4, 2, 1)), -jnp.ones((1, 4, 2, 1))], axis=2)
    mask = jnp.ones((1, 4, 4, 1)).at[:, :, 3:].set(0)
    filled = tasks.mean_fill(x, mask)
    np.testing.assert_allclose(filled[0, :, 3, 0], (8 * 1 - 4) / 12)
