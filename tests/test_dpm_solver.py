"""DPM-Solver++(2M, 3M) per frequency (docs/math.md §6.7b): the published updates by hand, exactness on
one-point data, the exact law, identities and NFE."""

import jax
import numpy as np
import pytest

from spd_jax.diffusion import analytic, bases, processes, samplers, spectrum
from spd_jax.diffusion.parameterization import Prediction

SHAPE = (3, 4, 4, 1)
KEY = jax.random.PRNGKey(3)
SPECTRUM = spectrum.power_law(SHAPE[1:], c1=1.0, c2=0.5, m=1.5)
SPD = processes.spd(SPECTRUM)
SPD_GAUSS = analytic.gaussian_denoiser(SPD, SPECTRUM)
POINT = np.linspace(-0.9, 0.8, 16).reshape(1, 4, 4, 1)
X_T = np.asarray(jax.random.normal(jax.random.PRNGKey(1), SHAPE))


def _vp_linear(t):
    """alpha, sigma of the continuous VP-linear process (beta 0.1 -> 20), written out by hand."""
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t * t
    return np.exp(-0.5 * integral), np.sqrt(1.0 - np.exp(-integral))


def _toy_x0(x, t):
    """An arbitrary (non-Bayes) data prediction, so that the test checks the update formula only."""
    return 0.3 * x + 0.7 * t - 0.2


def _toy_denoiser(x_t, t, *, key=None):
    tt = t.reshape(-1, 1, 1, 1)
    x0 = _toy_x0(x_t, tt)
    alpha, sigma = processes.vp_linear().marginal(t)
    return Prediction(x0, (x_t - alpha * x0) / sigma)


@pytest.mark.parametrize("lower_order_final", [False, True])
def test_equals_the_hand_computed_two_step_update(lower_order_final):
    """Lu et al. 2022 (DPM-Solver++(2M)): step 1 first order, step 2 with r = h_1/h_2."""
    grid = np.array([0.8, 0.4, 0.1])
    x = 1.3
    (a0, a1, a2), (s0, s1, s2) = _vp_linear(grid)
    lam = np.log(np.array([a0, a1, a2]) / np.array([s0, s1, s2]))
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    m0 = _toy_x0(x, grid[0])
    x1 = (s1 / s0) * x - a1 * (np.exp(-h1) - 1.0) * m0
    m1 = _toy_x0(x1, grid[1])
    r = h1 / h2
    d = m1 if lower_order_final else (1 + 1 / (2 * r)) * m1 - (1 / (2 * r)) * m0
    x2 = (s2 / s1) * x1 - a2 * (np.exp(-h2) - 1.0) * d
    with jax.disable_jit():
        out, info = samplers.sample(_toy_denoiser, processes.vp_linear(), method="dpm_solver_pp", num_steps=2,
                                    grid=grid, key=KEY, x_T=np.full((1, 1, 1, 1), x), clip_x0=False,
                                    lower_order_final=lower_order_final)
    assert float(out.ravel()[0]) == pytest.approx(x2, rel=1e-5)
    assert info["nfe"] == 2
    law = analytic.sampler_law(processes.vp_linear(), np.full((1, 1, 1), 0.5), method="dpm_solver_pp",
                               num_steps=2, grid=grid, start=(0.0, 1.0), lower_order_final=lower_order_final)
    assert law.var.shape == (1, 1, 1)


def test_final_step_to_zero_noise_returns_x0_hat():
    grid = np.array([0.9, 0.5, 0.2, 0.0])
    x = -0.4
    (a0, a1, _, _), (s0, s1, _, _) = _vp_linear(grid)
    h1 = np.log(a1 / s1) - np.log(a0 / s0)
    x1 = (s1 / s0) * x - a1 * np.expm1(-h1) * _toy_x0(x, 0.9)
    (a2,), (s2,) = _vp_linear(np.array([0.2]))
    h2 = np.log(a2 / s2) - np.log(a1 / s1)
    m0, m1 = _toy_x0(x, 0.9), _toy_x0(x1, 0.5)
    x2 = (s2 / s1) * x1 - a2 * np.expm1(-h2) * (m1 + (h2 / (2 * h1)) * (m1 - m0))
    with jax.disable_jit():
        out, _ = samplers.sample(_toy_denoiser, processes.vp_linear(), method="dpm_solver_pp", num_steps=3,
                                 grid=grid, key=KEY, x_T=np.full((1, 1, 1, 1), x), clip_x0=False)
    assert float(out.ravel()[0]) == pytest.approx(_toy_x0(x2, 0.2), rel=1e-5)


@pytest.mark.parametrize("name", ["vp_cosine", "spd", "blurring"])
def test_one_point_data_set_is_reproduced_exactly(name):
    proc = {"vp_cosine": processes.vp_cosine(), "spd": SPD, "blurring": processes.blurring(SHAPE[1:])}[name]
    den = analytic.finite_set_denoiser(proc, POINT)
    x, _ = samplers.sample(den, proc, method="dpm_solver_pp", num_steps=4, key=KEY, x_T=X_T, clip_x0=False)
    np.testing.assert_allclose(np.asarray(x), np.broadcast_to(POINT, SHAPE), atol=2e-4)
    basis = "identity" if proc.is_scalar else proc.basis
    law = analytic.sampler_law(proc, np.full(SHAPE[1:], 1e-20), mean=POINT[0], basis=basis,
                               method="dpm_solver_pp", num_steps=4)
    np.testing.assert_allclose(bases.from_spectral_np(law.mean[None], basis)[0], POINT[0], atol=1e-12)
    assert np.max(law.var) < 1e-12


def test_exact_law_reproduces_the_implementation():
    x, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=5, key=KEY, x_T=X_T, clip_x0=False)
    law = analytic.sampler_law(SPD, SPECTRUM, method="dpm_solver_pp", num_steps=5, start=(0.0, 1.0))
    expected = bases.from_spectral_np(law.gains["start"] * bases.to_spectral_np(X_T, "dft"), "dft")
    np.testing.assert_allclose(np.asarray(x), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_per_frequency_steps_use_each_frequencys_own_log_snr():
    """On SPD the table equals the scalar formula applied frequency by frequency."""
    run = samplers.plan(SPD, method="dpm_solver_pp", num_steps=4, lower_order_final=False)
    alpha, sigma = SPD.marginal64(run.grid)
    lam = np.log(alpha[:3]) - np.log(sigma[:3])
    h = lam[1:] - lam[:-1]
    np.testing.assert_allclose(run.tables["extrap"][1], h[1] / (2 * h[0]), rtol=1e-12)
    np.testing.assert_allclose(run.tables["a_u"][1], sigma[2] / sigma[1], rtol=1e-12)
    assert np.ptp(run.tables["extrap"][1]) > 1e-3  # genuinely frequency dependent


def test_order_one_is_ddim():
    dpm, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=4, key=KEY, x_T=X_T, clip_x0=False,
                             order=1)
    ddim, _ = samplers.sample(SPD_GAUSS, SPD, method="ddim", num_steps=4, key=KEY, x_T=X_T, clip_x0=False,
                              grid="log_linear")
    np.testing.assert_allclose(np.asarray(dpm), np.asarray(ddim), rtol=1e-4, atol=1e-4)
    two, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=4, key=KEY, x_T=X_T, clip_x0=False)
    assert np.max(np.abs(np.asarray(two) - np.asarray(ddim))) > 1e-3


def test_jit_and_eager_agree_and_batch_splits_are_identical():
    jitted, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=5, key=KEY, shape=SHAPE,
                                clip_x0=False)
    with jax.disable_jit():
        eager, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=5, key=KEY, shape=SHAPE,
                                   clip_x0=False)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    full, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=5, key=KEY, shape=(4,) + SHAPE[1:],
                              clip_x0=False)
    parts = [samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=5, key=KEY, shape=(2,) + SHAPE[1:],
                             index=np.array(idx), clip_x0=False)[0] for idx in ([2, 3], [0, 1])]
    np.testing.assert_array_equal(np.asarray(full), np.concatenate([parts[1], parts[0]]))


def test_kl_converges_and_nfe_is_num_steps():
    kls = [analytic.gaussian_kl(*analytic.sampler_law(SPD, SPECTRUM, method="dpm_solver_pp", num_steps=n)[:2], SPECTRUM)
           for n in (5, 20, 100)]
    assert kls[2] < kls[1] < kls[0] and kls[2] < 1e-3
    assert samplers.steps_for_nfe("dpm_solver_pp", 10) == 10
    assert samplers.count_nfe("dpm_solver_pp", 7) == (7, 0)


def test_per_step_extrapolation_and_bad_knobs():
    run = samplers.plan(SPD, method="dpm_solver_pp", num_steps=3, extrapolation=[0.0, 0.5, 2.0],
                        lower_order_final=False, grid=np.array([0.9, 0.5, 0.2, 0.05]))
    ref = samplers.plan(SPD, method="dpm_solver_pp", num_steps=3, lower_order_final=False,
                        grid=np.array([0.9, 0.5, 0.2, 0.05]))
    np.testing.assert_allclose(run.tables["extrap"][2], 2.0 * ref.tables["extrap"][2])
    np.testing.assert_allclose(run.tables["extrap"][1], 0.5 * ref.tables["extrap"][1])
    with pytest.raises(ValueError, match="per-step"):
        samplers.plan(SPD, method="dpm_solver_pp", num_steps=3, extrapolation=[1.0, 1.0])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3; got 4"):
        samplers.plan(SPD, method="dpm_solver_pp", num_steps=3, order=4)
    with pytest.raises(ValueError, match="did you mean 'order'"):
        samplers.plan(SPD, method="dpm_solver_pp", num_steps=3, ordr=2)


def test_gamma_per_step_matches_scalar_gamma():
    a = analytic.sampler_law(SPD, SPECTRUM, method="gradient_estimation", num_steps=4, gamma=[1.0, 2.0, 2.0, 2.0])
    b = analytic.sampler_law(SPD, SPECTRUM, method="gradient_estimation", num_steps=4, gamma=2.0)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-12)


@pytest.mark.parametrize("lower_order_final", [False, True])
def test_3m_equals_the_hand_computed_four_step_update(lower_order_final):
    """DPM-Solver++(3M) in the paper's D0, D1, D2 form: orders 1, 2, 3, 3 (1, 2, 2, 1 with
    lower_order_final on four steps: the last step first order, the one before second order)."""
    grid = np.array([0.9, 0.6, 0.35, 0.15, 0.05])
    alpha, sigma = _vp_linear(grid)
    lam = np.log(alpha / sigma)
    x, models = 0.8, []
    orders = [1, 2, 2, 1] if lower_order_final else [1, 2, 3, 3]
    for i, order in enumerate(orders):
        models.append(_toy_x0(x, grid[i]))
        h = lam[i + 1] - lam[i]
        m0 = models[-1]
        if order == 1:
            d_term = -alpha[i + 1] * np.expm1(-h) * m0
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d_term = -alpha[i + 1] * np.expm1(-h) * (m0 + (m0 - models[-2]) / (2 * r0))
        else:
            h0, h1 = lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
            r0, r1 = h0 / h, h1 / h
            d1_0, d1_1 = (m0 - models[-2]) / r0, (models[-2] - models[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            e = np.exp(-h)
            d_term = (-alpha[i + 1] * (e - 1.0) * m0 + alpha[i + 1] * ((e - 1.0) / h + 1.0) * d1
                      - alpha[i + 1] * ((e - 1.0 + h) / h**2 - 0.5) * d2)
        x = (sigma[i + 1] / sigma[i]) * x + d_term
    with jax.disable_jit():
        out, info = samplers.sample(_toy_denoiser, processes.vp_linear(), method="dpm_solver_pp", num_steps=4,
                                    grid=grid, key=KEY, x_T=np.full((1, 1, 1, 1), 0.8), clip_x0=False, order=3,
                                    lower_order_final=lower_order_final)
    assert float(out.ravel()[0]) == pytest.approx(x, rel=1e-5)
    assert info["nfe"] == 4


def test_3m_exact_law_reproduces_the_implementation_and_converges_at_third_order():
    x, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=6, key=KEY, x_T=X_T, clip_x0=False,
                           order=3)
    law = analytic.sampler_law(SPD, SPECTRUM, method="dpm_solver_pp", num_steps=6, start=(0.0, 1.0), order=3)
    expected = bases.from_spectral_np(law.gains["start"] * bases.to_spectral_np(X_T, "dft"), "dft")
    np.testing.assert_allclose(np.asarray(x), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    two, _ = samplers.sample(SPD_GAUSS, SPD, method="dpm_solver_pp", num_steps=6, key=KEY, x_T=X_T, clip_x0=False)
    assert np.max(np.abs(np.asarray(x) - np.asarray(two))) > 1e-3  # the third-order terms act

    def kl(n, order):
        law = analytic.sampler_law(SPD, SPECTRUM, method="dpm_solver_pp", num_steps=n, order=order)
        return analytic.gaussian_kl(law.mean, law.var, SPECTRUM)

    # the KL is quadratic in the output error: a higher-order solver's KL falls faster with N
    assert kl(50, 3) < 0.5 * kl(50, 2)
    assert kl(100, 3) / kl(50, 3) < kl(100, 2) / kl(50, 2)
