"""Processes: closed forms, validity (docs/math.md §1.3 V1-V3), transitions, posteriors and sampling laws."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from spd_jax.diffusion import bases, processes, spectrum

SHAPE = (8, 8, 2)
SPECTRUM = spectrum.power_law(SHAPE)  # the CIFAR-10 preset on an 8x8 grid (S spans 2e4 .. 0.04)


def all_processes():
    return [
        processes.vp_linear(),
        processes.vp_linear(num_steps=100),
        processes.vp_cosine(),
        processes.blurring(SHAPE),
        processes.ihdm(SHAPE, num_levels=20),
        processes.spd(SPECTRUM),
        processes.spd(SPECTRUM, deviation=0.1),
        processes.ddm_constant(),
        processes.rectified_flow(),
    ]


PROCS = {p.name: p for p in all_processes()}


def test_ddm_constant_is_image_to_zero_plus_zero_to_noise():
    t = np.linspace(0, 1, 11)
    alpha, sigma = processes.ddm_constant().marginal(t)
    np.testing.assert_allclose(alpha.ravel(), 1 - t, atol=1e-7)
    np.testing.assert_allclose(sigma.ravel(), np.sqrt(t), atol=1e-7)
    alpha, sigma = processes.rectified_flow().marginal64(t)
    np.testing.assert_allclose(alpha.ravel(), 1 - t)
    np.testing.assert_allclose(sigma.ravel(), t)


def test_spd_marginal_variance_is_the_geodesic_closed_form():
    """alpha^2 S + sigma^2 = S^(1-t) at every frequency (docs/math.md §2.5)."""
    t = np.linspace(0, 1, 21)
    alpha, sigma = processes.spd(SPECTRUM).marginal64(t)
    expected = SPECTRUM[None] ** (1 - t[:, None, None, None])
    np.testing.assert_allclose(alpha**2 * SPECTRUM + sigma**2, expected, rtol=1e-12)
    a32, s32 = processes.spd(SPECTRUM).marginal(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(a32**2 * SPECTRUM + s32**2, expected, rtol=2e-5)


def test_spd_handles_unit_spectrum_with_its_limit():
    """S = 1 exactly (log S = 0) uses the limit abar = 1 - t, sigma^2 = t: no 0/0."""
    spec = SPECTRUM.copy()
    spec[0, 1] = spec[0, -1] = 1.0
    alpha, sigma = processes.spd(spec).marginal64(np.array([0.25, 0.5]))
    np.testing.assert_allclose(alpha[:, 0, 1, 0] ** 2, [0.75, 0.5])
    np.testing.assert_allclose(sigma[:, 0, 1, 0] ** 2, [0.25, 0.5])


def test_spd_small_sigma_is_accurate_in_float32():
    """sigma^2 from the expm1 form keeps full relative accuracy at the first step (docs/math.md §10)."""
    t = np.float32(1e-4)
    _, s32 = processes.spd(SPECTRUM).marginal(t)
    _, s64 = processes.spd(SPECTRUM).marginal64(np.float64(t))
    np.testing.assert_allclose(np.asarray(s32) ** 2, s64**2, rtol=1e-4)


def test_spd_monte_carlo_variance_matches_geodesic():
    """Forward-sampled Gaussian data have E|B x_t|^2 = S^(1-t) (synthetic data with spectrum S)."""
    proc = processes.spd(SPECTRUM)
    n = 4096
    z = jax.random.normal(jax.random.key(0), (n,) + SHAPE)
    x0 = bases.from_spectral(jnp.sqrt(SPECTRUM) * bases.to_spectral(z, "dft"), "dft")
    t = 0.4
    xt, _ = proc.forward_sample(x0, jnp.full((n,), t), jax.random.key(1))
    var = np.mean(np.abs(np.asarray(bases.to_spectral(xt, "dft"))) ** 2, axis=0)
    expected = SPECTRUM ** (1 - t)
    # relative Monte-Carlo error of a mean of n squared Gaussians is ~ sqrt(2/n) = 2.2 %
    np.testing.assert_allclose(var, expected, rtol=0.12)
    assert abs(np.mean(var / expected) - 1) < 0.01


@pytest.mark.parametrize("name", sorted(PROCS))
def test_every_process_is_valid_and_ends_where_it_claims(name):
    proc = PROCS[name]
    times = np.linspace(0, 1, 201)
    alpha, sigma = proc.marginal64(times)
    alpha, sigma = np.broadcast_arrays(alpha, sigma)
    # SNR non-increasing <=> sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 >= 0
    ratio = np.divide(alpha[1:], alpha[:-1], out=np.zeros_like(alpha[1:]), where=alpha[:-1] > 0)
    var_ts = sigma[1:] ** 2 - ratio**2 * sigma[:-1] ** 2
    assert np.all(var_ts >= -1e-12), "SNR must not increase"
    assert np.all(var_ts.sum(axis=0) > 0) or name == "ihdm", "every frequency must be noised"
    if proc.gaussian_prior:
        assert np.max(alpha[-1]) < 0.01 and np.max(np.abs(sigma[-1] - 1)) < 0.01
    if name not in ("blurring", "ihdm", "vp_linear_T100"):
        assert np.allclose(alpha[0], 1) and np.allclose(sigma[0], 0)


class MarginalTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(PROCS))
    def test_float32_matches_float64_and_shapes_broadcast(self, name):
        proc = PROCS[name]
        t = jnp.array([0.1, 0.5, 0.9], jnp.float32)
        alpha, sigma = self.variant(proc.marginal)(t)
        a64, s64 = proc.marginal64(np.asarray(t, np.float64))
        np.testing.assert_allclose(alpha, a64, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sigma, s64, rtol=1e-4, atol=1e-6)
        expected = (3, 1, 1, 1) if proc.is_scalar else (3,) + proc.grid_shape
        self.assertEqual(alpha.shape, expected)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("vp_cosine", "spd", "blurring", "ddm_constant")
    def test_transition_composes_marginals(self, name):
        """alpha_t = alpha_{t|s} alpha_s and sigma_t^2 = alpha_{t|s}^2 sigma_s^2 + sigma_{t|s}^2."""
        proc = PROCS[name]
        t, s = jnp.float32(0.7), jnp.float32(0.3)
        a_ts, s_ts = self.variant(proc.transition)(t, s)
        a_t, s_t = proc.marginal(t)
        a_s, s_s = proc.marginal(s)
        np.testing.assert_allclose(a_ts * a_s, a_t, rtol=1e-5)
        np.testing.assert_allclose(a_ts**2 * s_s**2 + s_ts**2, s_t**2, rtol=1e-4)


@pytest.mark.parametrize("name", ["vp_linear", "spd", "blurring", "rectified_flow"])
def test_posterior_coefficients_agree_with_monte_carlo(name):
    """Regressing u_s on (u_t, u_0) for jointly sampled pairs recovers (1.3)."""
    proc = PROCS[name]
    t, s = 0.6, 0.35
    rng = np.random.default_rng(0)
    n = 20000
    u0 = 1.3  # one fixed clean coefficient per frequency
    a_s, s_s = (np.asarray(v, np.float64) for v in proc.marginal64(s))
    a_ts, s_ts = (np.asarray(v, np.float64) for v in proc.transition(jnp.float32(t), jnp.float32(s)))
    shape = (n,) + np.broadcast_shapes(np.shape(a_s), np.shape(a_ts))
    u_s = a_s * u0 + s_s * rng.normal(size=shape)
    u_t = a_ts * u_s + s_ts * rng.normal(size=shape)
    cov = np.mean((u_s - u_s.mean(0)) * (u_t - u_t.mean(0)), axis=0)
    slope = cov / np.var(u_t, axis=0)
    intercept = u_s.mean(0) - slope * u_t.mean(0)
    resid = np.std(u_s - slope * u_t - intercept, axis=0)
    coef_ut, coef_u0, std = (np.asarray(v) for v in proc.posterior(jnp.float32(t), jnp.float32(s)))
    np.testing.assert_allclose(slope, np.broadcast_to(coef_ut, slope.shape), atol=0.03)
    np.testing.assert_allclose(intercept, np.broadcast_to(coef_u0 * u0, slope.shape), atol=0.03)
    np.testing.assert_allclose(resid, np.broadcast_to(std, slope.shape), rtol=0.03, atol=1e-3)


def test_posterior_at_zero_returns_the_data():
    coef_ut, coef_u0, std = processes.vp_cosine().posterior(jnp.float32(0.5), jnp.float32(0.0))
    assert float(coef_ut) == 0 and np.isclose(float(coef_u0), 1) and float(std) == 0


def test_forward_sample_randomness_is_per_example():
    """Splitting a batch, or shifting its indices, reproduces the same noise bit for bit."""
    proc = PROCS["spd"]
    x0 = jax.random.uniform(jax.random.key(0), (6,) + SHAPE, minval=-1, maxval=1)
    t = jnp.linspace(0.1, 0.9, 6)
    key = jax.random.key(3)
    full, eps = jax.jit(proc.forward_sample)(x0, t, key)
    tail, eps_tail = proc.forward_sample(x0[2:], t[2:], key, index=jnp.arange(2, 6))
    np.testing.assert_array_equal(eps[2:], eps_tail)
    np.testing.assert_allclose(full[2:], tail, atol=1e-6)
    assert not np.allclose(eps[0], eps[1])


def test_prior_sample_is_white_noise():
    x = processes.spd(SPECTRUM).prior_sample(jax.random.key(0), (512,) + SHAPE)
    assert abs(float(jnp.std(x)) - 1) < 0.01 and abs(float(jnp.mean(x))) < 0.01


def test_ihdm_prior_needs_data_and_blurs_it():
    proc = PROCS["ihdm"]
    with pytest.raises(ValueError, match="data-dependent prior"):
        proc.prior_sample(jax.random.key(0), (2,) + SHAPE)
    data = jax.random.uniform(jax.random.key(1), (3,) + SHAPE)
    x = proc.prior_sample(jax.random.key(0), (3,) + SHAPE, data=data)
    # the DC (image mean) is never corrupted, beyond the 0.01 noise
    np.testing.assert_allclose(x.mean(axis=(1, 2)), data.mean(axis=(1, 2)), atol=0.01)
    assert float(jnp.std(x - data)) > 0.05  # but everything else is blurred away


def test_ddm_linear_has_its_offset_term():
    proc = processes.ddm_linear()
    x0 = jnp.zeros((2, 4, 4, 1))
    xt, eps, slope = proc.forward_sample(x0, jnp.array([0.5, 0.5]), jax.random.key(0))
    np.testing.assert_allclose(xt, 0.5 * slope * (0.25 - 0.5) + np.sqrt(0.5) * eps, atol=1e-6)
    assert float(jnp.max(jnp.abs(slope))) <= 1.0


@given(
    c1=st.floats(0.1, 10), c2=st.floats(1e-3, 2), m=st.floats(0.5, 3),
    t=st.floats(0.01, 0.99), dt=st.floats(0.001, 0.2),
)
def test_spd_snr_decreases_for_any_power_law(c1, c2, m, t, dt):
    proc = processes.spd(spectrum.power_law((4, 4, 1), c1, c2, m))
    a1, s1 = proc.marginal64(t)
    a2, s2 = proc.marginal64(min(t + dt, 1.0))
    assert np.all(a2 / s2 <= a1 / s1)


# ---- bad input ------------------------------------------------------------------------------


def test_bad_spectrum_names_the_frequency():
    spec = SPECTRUM.copy()
    spec[2, 3, 1] = 0.0
    with pytest.raises(ValueError, match=r"\(ky, kx, channel\) = \(2, 3, 1\)"):
        processes.spd(spec)
    spec = SPECTRUM.copy()
    spec[1, 2, 0] *= 2  # breaks S(k) = S(-k)
    with pytest.raises(ValueError, match="even in k"):
        processes.spd(spec)
    with pytest.raises(ValueError, match=r"shape \(H, W, C\)"):
        processes.spd(SPECTRUM[..., 0])


def test_deviation_outside_realisable_range_is_rejected():
    with pytest.raises(ValueError, match="SNR stops decreasing near t=0"):
        processes.spd(SPECTRUM, deviation=0.3)


def test_non_monotone_process_names_frequency_and_time():
    bad = processes.Process(
        params={}, kind="rectified_flow", basis="identity", grid_shape=None, name="ok"
    )
    processes.validate(bad)  # the real one is fine
    proc = processes.spd(SPECTRUM)
    flipped = proc.replace(params={**proc.params, "log_spectrum": proc.params["log_spectrum"]},
                           config=(("deviation", 0.3),))
    with pytest.raises(ValueError, match=r"at t=.* frequency \(ky, kx, channel\)|SNR increases"):
        processes.validate(flipped)


def test_registry_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'vp_cosine'"):
        processes.make("vp_cosin")
    with pytest.raises(ValueError, match="needs a spectrum"):
        processes.make("spd")
    assert processes.make("blurring", shape=SHAPE).basis == "dct"


def test_shape_and_argument_errors():
    proc = PROCS["spd"]
    with pytest.raises(ValueError, match="does not match the process"):
        proc.forward_sample(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        proc.forward_sample(jnp.zeros((2,) + SHAPE), jnp.zeros((3,)), jax.random.key(0))
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        processes.vp_linear(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        processes.vp_linear(num_steps=1)
