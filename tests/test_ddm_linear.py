"""DDM with linear attenuation (docs/math.md §2.6b, §5.2, §6.4): the (a, C) targets, the head, the
dual loss and the bridge step, which with oracle predictions keeps the forward law on any grid."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_jax import losses
from spd_jax.diffusion import processes, samplers
from spd_jax.diffusion.parameterization import Prediction, ddm_linear_x0
from spd_jax.models import UNet
from spd_jax.models.heads import prediction_from_head
from tests.test_losses import fit, tiny_batch
from tests.test_models import random_variables

PROC = processes.ddm_linear()
KEY = jax.random.PRNGKey(3)
RNG = np.random.default_rng(0)
X0 = RNG.uniform(-1, 1, (1, 2, 2, 1)).astype(np.float32)  # one data point ...
SLOPE = np.clip(RNG.standard_normal((1, 2, 2, 1)), -1, 1).astype(np.float32)  # ... with one slope
C = -X0 - SLOPE / 2


def offset_path(t):
    """H_t = a t^2/2 + C t of the fixed (x0, a), for t of shape (B,) or a scalar."""
    t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1, 1, 1))
    return 0.5 * SLOPE * t * t + C * t


def oracle(x_t, t, *, key=None):
    """The exact predictions for the one-point data set {(x0, a)}: eps is read off x_t."""
    del key
    t_b = t.reshape((-1, 1, 1, 1))
    eps = (x_t - X0 - offset_path(t)) / jnp.sqrt(t_b)
    slope, c = SLOPE + 0 * x_t, C + 0 * x_t
    return Prediction(ddm_linear_x0(x_t, slope, c, eps, t_b), eps, c, slope)


def exact_state(t: float, batch: int, seed: int):
    """Draws from the forward law x_t = x0 + H_t + sqrt(t) eps, and their eps."""
    eps = jax.random.normal(jax.random.PRNGKey(seed), (batch,) + X0.shape[1:])
    return X0 + offset_path(t) + np.sqrt(t) * eps, eps


def test_targets_reproduce_the_forward_sample_and_end_at_zero():
    """x_t = x0 + H_t(a, C) + sqrt(t) eps with C = -x0 - a/2, and x0 + H_1 = 0 (the image is gone at t = 1)."""
    x0 = jnp.asarray(RNG.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
    t = jnp.array([0.1, 0.5, 0.9])
    x_t, eps, slope = PROC.forward_sample(x0, t, jax.random.key(1))
    a, c = PROC.targets(x0, slope)
    t_b = t.reshape((-1, 1, 1, 1))
    np.testing.assert_allclose(x_t, x0 + 0.5 * a * t_b**2 + c * t_b + jnp.sqrt(t_b) * eps, atol=1e-6)
    np.testing.assert_allclose(x0 + 0.5 * a + c, 0.0, atol=1e-6)
    assert float(jnp.max(jnp.abs(slope))) <= 1.0 and float(jnp.std(slope)) > 0.3


def test_head_recovers_the_data_from_the_true_outputs():
    x0 = jnp.asarray(RNG.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    t = jnp.array([0.3, 0.8])
    x_t, eps, slope = PROC.forward_sample(x0, t, jax.random.key(2))
    a, c = PROC.targets(x0, slope)
    pred = prediction_from_head(PROC, x_t, t, (jnp.concatenate([a, c], -1), eps), "ddm_linear")
    np.testing.assert_allclose(pred.x0, x0, atol=2e-6)
    np.testing.assert_array_equal(pred.a, a)
    with pytest.raises(ValueError, match="6 and 3 output channels"):
        prediction_from_head(PROC, x_t, t, (c, eps), "ddm_linear")
    with pytest.raises(ValueError, match="belongs to process 'ddm_linear'"):
        prediction_from_head(processes.ddm_constant(), x_t, t, (jnp.concatenate([a, c], -1), eps), "ddm_linear")


@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.floats(0.02, 0.95), min_size=3, max_size=3, unique=True))
def test_stochastic_bridge_with_oracle_keeps_the_forward_law_on_any_grid(cuts):
    """Started from the exact law at t0, every bridge step lands on the exact law at its level:
    (x_s - x0 - H_s)/sqrt(s) is N(0, 1), whatever the step sizes (docs/math.md §6.4)."""
    grid = np.concatenate([[0.97], np.sort(cuts)[::-1]])
    if np.min(-np.diff(grid)) < 1e-2:
        return
    x_T, _ = exact_state(grid[0], 4096, seed=len(cuts))
    x, info = samplers.sample(oracle, PROC, method="ddm_bridge", num_steps=3, grid=grid, key=KEY, x_T=x_T,
                              clip_x0=False)
    z = np.asarray((x - X0 - offset_path(grid[-1])) / np.sqrt(grid[-1])).reshape(len(x), -1)  # per pixel
    assert np.all(np.abs(z.mean(0)) < 5 / np.sqrt(len(z))) and np.all(np.abs(z.var(0) - 1) < 0.1), (
        grid, z.mean(0), z.var(0))
    assert info["nfe"] == 3


@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.floats(0.01, 0.98), min_size=4, max_size=4, unique=True))
def test_bridge_with_oracle_ends_exactly_at_the_data(cuts):
    grid = np.concatenate([[0.999], np.sort(cuts)[::-1], [0.0]])
    if np.min(-np.diff(grid)) < 1e-3:
        return
    x, _ = samplers.sample(oracle, PROC, method="ddm_bridge", num_steps=5, grid=grid, key=KEY, shape=(8, 2, 2, 1),
                           clip_x0=False)
    np.testing.assert_allclose(np.asarray(x), np.broadcast_to(X0, x.shape), atol=1e-5)


def test_deterministic_bridge_with_oracle_keeps_each_sample_s_noise():
    """Without noise the bridge is DDIM(eta = 0): x_s = x0 + H_s + sqrt(s) eps with the start's eps."""
    grid = np.array([0.9, 0.5, 0.2, 0.05])
    x_T, eps = exact_state(grid[0], 16, seed=5)
    x, _ = samplers.sample(oracle, PROC, method="ddm_bridge", num_steps=3, grid=grid, key=KEY, x_T=x_T,
                           clip_x0=False, stochastic=False)
    np.testing.assert_allclose(np.asarray(x), np.asarray(X0 + offset_path(0.05) + np.sqrt(0.05) * eps), atol=2e-5)


def test_bridge_clips_the_slope_and_uses_the_raw_c():
    """One hand-computed step t -> s with a predicted slope outside [-1, 1]: a_hat := 1, C_hat raw."""
    a, c, e, t, s = 3.0, -0.4, 0.6, 0.8, 0.3

    def heads(x_t, t_, *, key=None):
        full = 0 * x_t
        return Prediction(ddm_linear_x0(x_t, a + full, c + full, e + full, t_), e + full, c + full, a + full)

    x_t = 0.25
    with jax.disable_jit():
        x, _ = samplers.sample(heads, PROC, method="ddm_bridge", num_steps=1, grid=np.array([t, s]), key=KEY,
                               x_T=jnp.full((1, 1, 1, 1), x_t), clip_x0=False, stochastic=False)
    x0_hat = x_t - (0.5 * 1.0 * t + c) * t - np.sqrt(t) * e  # with the clipped slope
    expected = x0_hat + 0.5 * 1.0 * s * s + c * s + np.sqrt(s) * e
    assert float(x.ravel()[0]) == pytest.approx(expected, rel=1e-6)


def test_bridge_is_the_only_sampler_and_has_no_c_correction():
    with pytest.raises(ValueError, match="method='ddm_bridge'"):
        samplers.sample(oracle, PROC, method="ddim", num_steps=2, key=KEY, shape=(2, 2, 2, 1), clip_x0=False)
    with pytest.raises(ValueError, match="c_correction"):
        samplers.sample(oracle, PROC, method="ddm_bridge", num_steps=2, key=KEY, shape=(2, 2, 2, 1),
                        clip_x0=False, c_correction=True)

    def gaussian_heads(x_t, t, *, key=None):
        return Prediction(x_t, x_t)

    with pytest.raises(ValueError, match="needs a denoiser returning Prediction"):
        samplers.sample(gaussian_heads, PROC, method="ddm_bridge", num_steps=2, key=KEY, shape=(2, 2, 2, 1),
                        clip_x0=False)


class RecordingProcess:
    """ddm_linear whose forward draws are recorded, so that an oracle network can return the exact targets."""

    name, is_scalar = "ddm_linear", True

    def __init__(self):
        self.drawn = {}

    def forward_sample(self, x0, t, key, index=None):
        x_t, eps, slope = PROC.forward_sample(x0, t, key, index=index)
        self.drawn.update(x0=x0, eps=eps, slope=slope)
        return x_t, eps, slope

    def targets(self, x0, slope):
        return PROC.targets(x0, slope)


class LinearOracle:
    def __init__(self, process, error=0.0):
        self.process, self.error = process, error

    def apply(self, variables, x_t, t, cond=None, train=False, rngs=None):
        d = self.process.drawn
        a, c = PROC.targets(d["x0"], d["slope"])
        return jnp.concatenate([a + self.error, c], -1), d["eps"]


@pytest.mark.parametrize("weighting", losses.DDM_WEIGHTINGS)
def test_linear_loss_vanishes_exactly_at_the_true_slope_c_and_eps(weighting):
    batch = tiny_batch(6)
    for error, zero in ((0.0, True), (0.1, False)):
        process = RecordingProcess()
        loss_fn = losses.make_ddm_loss(LinearOracle(process, error), process, head="ddm_linear", weighting=weighting)
        with jax.disable_jit():
            loss, metrics = loss_fn({}, batch, jax.random.key(0))
        assert (float(loss) < 1e-6) == zero, (error, float(loss), metrics)


def test_linear_loss_fits_a_tiny_batch_and_refuses_a_mismatched_process():
    model = UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=2,
                 num_decoders=2, first_output_mult=2, time_embedding="log")
    batch = tiny_batch(7)
    variables = random_variables(model, 7, batch["image"], jnp.full((8,), 0.5))
    outputs = model.apply(variables, batch["image"], jnp.full((8,), 0.5))
    assert [o.shape[-1] for o in outputs] == [2, 1]
    before, after = fit(losses.make_ddm_loss(model, PROC, head="ddm_linear", weighting="adm_const"), variables, batch)
    assert after < 0.75 * before, (before, after)
    with pytest.raises(ValueError, match="go together"):
        losses.make_ddm_loss(model, processes.ddm_constant(), head="ddm_linear")
    with pytest.raises(ValueError, match="go together"):
        losses.make_ddm_loss(model, PROC, head="ddm_dual")


jit_sample = functools.partial(samplers.sample, oracle, PROC, method="ddm_bridge", key=KEY, clip_x0=False)


@pytest.mark.parametrize("jitted", [False, True])
def test_bridge_gives_the_same_samples_with_and_without_jit(jitted):
    """Example i's noise depends only on (key, i): chunks of a batch reproduce the whole batch."""
    grid = np.array([0.999, 0.6, 0.2, 0.0])
    x_T, _ = exact_state(grid[0], 6, seed=9)
    whole, _ = jit_sample(num_steps=3, grid=grid, x_T=x_T)
    if jitted:
        part, _ = jit_sample(num_steps=3, grid=np.array([0.999, 0.6, 0.2, 0.05]), x_T=x_T[2:4], index=np.arange(2, 4))
        ref, _ = jit_sample(num_steps=3, grid=np.array([0.999, 0.6, 0.2, 0.05]), x_T=x_T)
        np.testing.assert_allclose(np.asarray(part), np.asarray(ref[2:4]), rtol=1e-6, atol=1e-6)
    else:
        with jax.disable_jit():
            eager, _ = jit_sample(num_steps=3, grid=grid, x_T=x_T)
        np.testing.assert_allclose(np.asarray(eager), np.asarray(whole), atol=1e-5)
