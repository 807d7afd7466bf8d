"""Every target converts to (x0, eps) exactly, per frequency, for every process."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from spd_jax.diffusion import parameterization as param
from spd_jax.diffusion import processes, spectrum

SHAPE = (8, 8, 3)
PROCS = {
    p.name: p
    for p in (
        processes.vp_cosine(),
        processes.spd(spectrum.power_law(SHAPE)),
        processes.blurring(SHAPE),
        processes.ddm_constant(),
        processes.rectified_flow(),
    )
}


class RoundTripTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=sorted(PROCS), target=param.TARGETS)
    def test_target_round_trip(self, name, target):
        proc = PROCS[name]
        x0 = jax.random.uniform(jax.random.key(0), (4,) + SHAPE, minval=-1, maxval=1)
        t = jnp.array([0.05, 0.3, 0.6, 0.9])
        x_t, eps = proc.forward_sample(x0, t, jax.random.key(1))

        @self.variant
        def convert(x0, eps, x_t, t):
            out = param.target_from_x0_eps(proc, x0, eps, t, target)
            return param.prediction_from_output(proc, x_t, t, out, target)

        pred = convert(x0, eps, x_t, t)
        alpha, sigma = proc.marginal(t)
        # the forward identity x_t = B^-1(alpha B x0_hat + sigma B eps_hat) holds for every target
        np.testing.assert_allclose(proc.apply(pred.x0, alpha) + proc.apply(pred.eps, sigma), x_t, atol=2e-4)
        np.testing.assert_allclose(pred.eps, eps, atol=5e-4)
        # x0 itself is recovered wherever alpha is not tiny (1/alpha amplifies float32 round-off)
        alpha_min = np.min(np.asarray(alpha).reshape(4, -1), axis=1)
        ok = alpha_min > 0.05
        np.testing.assert_allclose(pred.x0[ok], x0[ok], atol=5e-4)


def test_v_is_salimans_ho_v_for_vp():
    alpha, sigma = jnp.float32(0.6), jnp.float32(0.8)
    v = param.v_from_x0_eps(jnp.float32(2.0), jnp.float32(-1.0), alpha, sigma)
    np.testing.assert_allclose(v, 0.6 * -1.0 - 0.8 * 2.0, rtol=1e-6)


def test_rectified_flow_velocity_is_eps_minus_x0():
    proc = PROCS["rectified_flow"]
    x0 = jnp.ones((2, 4, 4, 1))
    eps = -jnp.ones((2, 4, 4, 1))
    flow = param.target_from_x0_eps(proc, x0, eps, jnp.array([0.2, 0.7]), "flow")
    np.testing.assert_allclose(flow, eps - x0, atol=1e-6)


def test_ddm_dual_head_reproduces_the_official_estimate():
    """x0_hat = x_t - c t - sqrt(t) eps for constant attenuation, and exact with true heads."""
    proc = PROCS["ddm_constant"]
    x0 = jax.random.uniform(jax.random.key(2), (3, 4, 4, 1), minval=-1, maxval=1)
    t = jnp.array([0.1, 0.5, 0.95])
    x_t, eps = proc.forward_sample(x0, t, jax.random.key(3))
    pred = param.ddm_prediction(proc, x_t, t, -x0, eps)
    np.testing.assert_allclose(pred.x0, x0, atol=1e-5)
    tb = t[:, None, None, None]
    c_hat = jnp.full_like(x0, 0.3)
    official = x_t - c_hat * tb - jnp.sqrt(tb) * eps
    np.testing.assert_allclose(param.ddm_prediction(proc, x_t, t, c_hat, eps).x0, official, atol=1e-6)
    alpha, sigma = proc.marginal(t)
    np.testing.assert_allclose(param.ddm_eps_from_c(x_t, -x0, alpha, sigma), eps, atol=1e-4)


def test_make_denoiser_follows_the_contract():
    proc = PROCS["spd"]
    denoiser = param.make_denoiser(lambda x, t: jnp.zeros_like(x), proc, "eps")
    x_t = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    pred = denoiser(x_t, jnp.array([0.5, 0.5]), key=None)
    assert isinstance(pred, param.Prediction) and pred.c is None
    np.testing.assert_allclose(pred.eps, 0.0)
    alpha, _ = proc.marginal(jnp.float32(0.5))
    np.testing.assert_allclose(pred.x0, proc.apply(x_t, 1.0 / alpha), rtol=1e-4, atol=1e-4)


def test_bad_targets_and_processes_are_rejected():
    with np.testing.assert_raises_regex(ValueError, "unknown prediction target 'epsilon'"):
        param.make_denoiser(lambda x, t: x, PROCS["vp_cosine"], "epsilon")
    with np.testing.assert_raises_regex(ValueError, "frequency-independent"):
        param.ddm_prediction(PROCS["spd"], jnp.zeros((1,) + SHAPE), jnp.ones(1), 0.0, 0.0)
    with np.testing.assert_raises_regex(ValueError, "discrete"):
        param.marginal_derivative(processes.vp_linear(num_steps=100), jnp.float32(0.5))
