"""Analytic testbeds (docs/math.md §7): exact denoisers checked against dense pixel-space Bayes, the
finite-set identities, and the exact KL/W2 formulas and sampler laws."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from spd_jax.diffusion import analytic, bases, processes, spectrum

HW = (4, 4, 1)
SPEC_DFT = spectrum.power_law(HW, c1=1.0, c2=0.5, m=1.5)
SPEC_DCT = spectrum.power_law(HW, c1=1.0, c2=0.5, m=1.5, basis="dct")
SPD = processes.spd(SPEC_DFT)
BLUR = processes.blurring(HW)
RNG = np.random.default_rng(0)


def _pixel_operator(gain, basis):
    """Dense (16, 16) pixel-space matrix of the diagonal operator B^-1 diag(gain) B."""
    eye = np.eye(16).reshape(16, 4, 4, 1)
    cols = bases.from_spectral_np(gain * bases.to_spectral_np(eye, basis), basis)
    return cols.reshape(16, 16).T


def _dense_mixture_posterior(proc, t, x_t, weights, means, variances, basis):
    """E[x0 | x_t] and E[eps | x_t] by dense float64 Bayes in pixel space."""
    alpha, sigma = proc.marginal64(np.array([t]))
    a_op = _pixel_operator(np.broadcast_to(alpha[0], HW), basis)
    s_op = _pixel_operator(np.broadcast_to(sigma[0], HW), basis)
    x = x_t.reshape(-1)
    logs, x0s, epss = [], [], []
    for w, mu, var in zip(weights, means, variances, strict=True):
        c_op = _pixel_operator(var, basis)
        cov = a_op @ c_op @ a_op.T + s_op @ s_op.T
        resid = x - a_op @ mu.reshape(-1)
        sol = np.linalg.solve(cov, resid)
        logs.append(np.log(w) - 0.5 * resid @ sol - 0.5 * np.linalg.slogdet(cov)[1])
        x0s.append(mu.reshape(-1) + c_op @ a_op.T @ sol)
        epss.append(s_op.T @ sol)
    post = np.exp(np.array(logs) - max(logs))
    post /= post.sum()
    return (post @ np.array(x0s)).reshape(HW), (post @ np.array(epss)).reshape(HW)


@pytest.mark.parametrize("proc,basis,spec", [(SPD, "dft", SPEC_DFT), (BLUR, "dct", SPEC_DCT)])
def test_gmm_denoiser_equals_dense_pixel_space_bayes(proc, basis, spec):
    weights = np.array([0.5, 0.3, 0.2])
    means = RNG.uniform(-1, 1, (3,) + HW)
    variances = np.stack([spec * s for s in (0.05, 0.2, 1.0)])
    den = analytic.gmm_denoiser(proc, weights, means, variances, chunk=2)  # 2 chunks, one padded
    for t in (0.1, 0.5, 0.9):
        x_t = RNG.normal(size=(1,) + HW)
        pred = den(jnp.asarray(x_t, jnp.float32), jnp.full((1,), t))
        x0, eps = _dense_mixture_posterior(proc, t, x_t[0], weights, means, variances, basis)
        np.testing.assert_allclose(np.asarray(pred.x0[0]), x0, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.asarray(pred.eps[0]), eps, rtol=1e-3, atol=1e-4)


MEAN = np.linspace(-0.3, 0.3, 16).reshape(HW)
GAUSSIAN = {
    name: (proc, basis, spec, analytic.gaussian_denoiser(proc, spec, MEAN, basis=basis))
    for name, proc, basis, spec in [("spd", SPD, "dft", SPEC_DFT), ("blurring", BLUR, "dct", SPEC_DCT),
                                    ("vp_cosine", processes.vp_cosine(), "dft", SPEC_DFT)]
}


@given(t=st.floats(0.01, 0.99), which=st.sampled_from(sorted(GAUSSIAN)))
def test_gaussian_denoiser_is_exact_and_consistent(t, which):
    proc, basis, spec, den = GAUSSIAN[which]
    x_t = RNG.normal(size=(1,) + HW)
    pred = den(jnp.asarray(x_t, jnp.float32), jnp.full((1,), t))
    alpha, sigma = proc.marginal64(np.array([t]))
    recon = alpha[0] * bases.to_spectral_np(np.asarray(pred.x0), basis) + sigma[0] * bases.to_spectral_np(
        np.asarray(pred.eps), basis)
    np.testing.assert_allclose(bases.from_spectral_np(recon, basis), x_t, atol=1e-4)
    x0, _ = _dense_mixture_posterior(proc, t, x_t[0], [1.0], MEAN[None], spec[None], basis)
    np.testing.assert_allclose(np.asarray(pred.x0[0]), x0, rtol=1e-3, atol=1e-4)


def test_finite_set_score_identity_and_nearest_point_limit():
    """docs/math.md §7.3: with F(x) = -s^2 log sum_i exp(-|x - x_i|^2 / (2 s^2)) (VE), grad F = s eps*."""
    proc = processes.vp_linear()
    points = RNG.uniform(-1, 1, (6,) + HW)
    den = analytic.finite_set_denoiser(proc, points, chunk=4)
    t = 0.3
    (alpha,), (sigma,) = (a.ravel() for a in proc.marginal64(np.array([t])))
    ve = sigma / alpha
    x = points[2] + 0.4 * RNG.normal(size=HW)

    def free_energy(y):
        d2 = np.sum((y[None] - points) ** 2, axis=(1, 2, 3))
        return -(ve**2) * np.log(np.sum(np.exp(-(d2 - d2.min()) / (2 * ve**2)))) + d2.min() / 2

    grad = np.zeros(16)
    for i in range(16):
        step = np.zeros(16)
        step[i] = 1e-5
        grad[i] = (free_energy(x + step.reshape(HW)) - free_energy(x - step.reshape(HW))) / 2e-5
    eps = den(jnp.asarray((alpha * x)[None], jnp.float32), jnp.full((1,), t)).eps
    np.testing.assert_allclose(grad, ve * np.asarray(eps).ravel(), rtol=1e-3, atol=1e-4)
    near = den(jnp.asarray((points[4] + 1e-3)[None], jnp.float32), jnp.full((1,), 1e-4)).x0
    np.testing.assert_allclose(np.asarray(near[0]), points[4], atol=1e-5)


def test_mixture_denoisers_are_chunk_and_batch_split_invariant():
    points = RNG.uniform(-1, 1, (10,) + HW)
    x_t = jnp.asarray(RNG.normal(size=(4,) + HW), jnp.float32)
    t = jnp.array([0.2, 0.5, 0.5, 0.8])
    small = analytic.finite_set_denoiser(SPD, points, chunk=3)
    big = analytic.finite_set_denoiser(SPD, points, chunk=64)
    full = small(x_t, t)
    np.testing.assert_allclose(np.asarray(full.x0), np.asarray(big(x_t, t).x0), rtol=1e-5, atol=1e-6)
    halves = [small(x_t[:2], t[:2]), small(x_t[2:], t[2:])]
    np.testing.assert_array_equal(np.asarray(full.x0), np.concatenate([h.x0 for h in halves]))
    gauss = analytic.gaussian_denoiser(SPD, SPEC_DFT)
    np.testing.assert_array_equal(np.asarray(gauss(x_t, t).eps),
                                  np.concatenate([gauss(x_t[:2], t[:2]).eps, gauss(x_t[2:], t[2:]).eps]))


def test_gmm_with_one_component_is_the_gaussian_denoiser():
    mean = RNG.uniform(-0.5, 0.5, HW)
    gmm = analytic.gmm_denoiser(BLUR, [1.0], mean[None], SPEC_DCT[None])
    gauss = analytic.gaussian_denoiser(BLUR, SPEC_DCT, mean)
    x_t, t = jnp.asarray(RNG.normal(size=(2,) + HW), jnp.float32), jnp.array([0.3, 0.7])
    np.testing.assert_allclose(np.asarray(gmm(x_t, t).x0), np.asarray(gauss(x_t, t).x0), rtol=1e-5, atol=1e-6)


def test_kl_and_w2_equal_dense_pixel_space_values():
    mean_pix = RNG.uniform(-0.5, 0.5, HW)
    law_var = SPEC_DFT * bases.mirror(RNG.uniform(0.5, 2.0, HW)) * RNG.uniform(0.5, 2.0, HW)
    law_var = 0.5 * (law_var + bases.mirror(law_var))  # even in k: a real pixel covariance
    law_mean = bases.to_spectral_np(mean_pix[None], "dft")[0]
    kl = analytic.gaussian_kl(law_mean, law_var, SPEC_DFT)
    w2 = analytic.gaussian_w2(law_mean, law_var, SPEC_DFT)
    cov_out, cov_data = _pixel_operator(law_var, "dft"), _pixel_operator(SPEC_DFT, "dft")
    m = mean_pix.reshape(-1)
    inv = np.linalg.inv(cov_data)
    dense_kl = 0.5 * (np.trace(inv @ cov_out) - 16 + m @ inv @ m
                      + np.linalg.slogdet(cov_data)[1] - np.linalg.slogdet(cov_out)[1])
    root = scipy.linalg.sqrtm(cov_out)
    dense_w2 = np.sqrt(m @ m + np.trace(cov_out + cov_data - 2 * scipy.linalg.sqrtm(root @ cov_data @ root)).real)
    assert kl == pytest.approx(dense_kl, rel=1e-9)
    assert w2 == pytest.approx(dense_w2, rel=1e-6)
    assert analytic.gaussian_kl(law_mean, SPEC_DFT, SPEC_DFT, law_mean) == 0.0


def test_spd_marginal_is_the_geodesic_variance():
    t = np.array([0.1, 0.5, 0.9])
    alpha, sigma = SPD.marginal64(t)
    np.testing.assert_allclose(alpha**2 * SPEC_DFT + sigma**2, SPEC_DFT[None] ** (1 - t[:, None, None, None]),
                               rtol=1e-10)


def test_one_step_ddim_law_is_the_posterior_mean_law():
    """From the exact marginal at t, one DDIM step to 0 returns E[u0|u_t]: Var = (alpha S)^2 / v."""
    law = analytic.sampler_law(SPD, SPEC_DFT, method="ddim", num_steps=1, grid=np.array([0.6, 0.0]))
    alpha, sigma = SPD.marginal64(np.array([0.6]))
    v = alpha[0] ** 2 * SPEC_DFT + sigma[0] ** 2
    np.testing.assert_allclose(law.var, (alpha[0] * SPEC_DFT) ** 2 / v, rtol=1e-12)
    prior = analytic.sampler_law(SPD, SPEC_DFT, method="ddim", num_steps=1, grid=np.array([0.6, 0.0]),
                                 start="prior")
    np.testing.assert_allclose(prior.var, (alpha[0] * SPEC_DFT / v) ** 2, rtol=1e-12)  # sigma_1 = 1


def test_bad_testbeds_raise():
    with pytest.raises(ValueError, match="basis"):
        analytic.gaussian_denoiser(SPD, SPEC_DCT, basis="dct")
    with pytest.raises(ValueError, match="even in k"):
        analytic.gaussian_denoiser(SPD, RNG.uniform(0.5, 1, HW))
    with pytest.raises(ValueError, match="weights"):
        analytic.gmm_denoiser(SPD, [1.0, 2.0], np.zeros((1,) + HW), [1.0])
    with pytest.raises(ValueError, match="linear"):
        analytic.sampler_law(SPD, SPEC_DFT, method="predict_project", num_steps=2,
                             projection=lambda x, t: x)
    with pytest.raises(ValueError, match="start"):
        analytic.sampler_law(SPD, SPEC_DFT, method="ddim", num_steps=2, start="nope")
    assert jnp.all(jnp.isfinite(analytic.finite_set_denoiser(SPD, np.zeros((1,) + HW))(
        jnp.ones((1,) + HW), jnp.zeros((1,))).x0))
