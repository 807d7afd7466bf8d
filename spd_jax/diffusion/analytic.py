"""Exact denoisers and exact sampler laws for analytic testbeds (docs/math.md §7).

Denoisers (valid for every process; per frequency in the data's basis, docs/math.md §7.1-7.3):

* :func:`gaussian_denoiser` — Gaussian data N_B(m, S) diagonal in the basis;
* :func:`gmm_denoiser` — mixtures of such Gaussians (max-subtracted log-sum-exp, chunked over
  components);
* :func:`finite_set_denoiser` — the ideal memorising denoiser of a finite data set.

The data basis is the process's basis for spectral processes; a frequency-independent process is
diagonal in every basis, so its denoisers take ``basis`` (default ``"identity"``; e.g. ``"dft"``
for data with an image spectrum). Means are pixel-space arrays; spectra and variances are per
frequency in the data basis.

Exact laws: with the Gaussian denoiser every sampler except clipping is linear-Gaussian per
frequency, u_out(k) = M(k) + sum_j g_j(k) xi_j(k). :func:`sampler_law` propagates that affine form
through the *same* update code as :func:`spd_jax.diffusion.samplers.sample` (float64, NumPy), so the law is
the implementation's; :func:`gaussian_kl` and :func:`gaussian_w2` give KL (nats) and W2 to the
data (sums over all frequencies = pixel-space values, docs/math.md §7.1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.diffusion import bases
from spd_jax.diffusion.parameterization import Denoiser, Prediction
from spd_jax.diffusion.processes import Process, check_spectrum
from spd_jax.diffusion.samplers import UPDATES, Spectral, initial_cache, plan

_VAR_FLOOR = 1e-24  # floor of alpha^2 S + sigma^2 (finite-set denoisers at t = 0)


def _data_basis(process: Process, basis: str | None) -> str:
    if not process.is_scalar:
        if basis not in (None, process.basis):
            raise ValueError(
                f"process {process.name!r} is diagonal in the {process.basis!r} basis only; data in "
                f"basis {basis!r} would not give an exact per-frequency denoiser"
            )
        return process.basis
    return bases.check_basis("identity" if basis is None else basis)


def _check_image(process: Process, image_shape) -> tuple:
    shape = tuple(int(s) for s in image_shape)
    process.check_image_shape((1,) + shape)
    return shape


def _spectral_mean(mean, shape, basis) -> np.ndarray:
    """Pixel mean (H, W, C) (or None for zero) -> its coefficients in ``basis`` (float64/complex)."""
    if mean is None:
        return np.zeros(shape)
    mean = np.broadcast_to(np.asarray(mean, np.float64), shape)
    return bases.to_spectral_np(mean[None], basis)[0]


def _as_jax(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a, jnp.complex64 if np.iscomplexobj(a) else jnp.float32)


def gaussian_denoiser(process: Process, spectrum, mean=None, *, basis: str | None = None) -> Denoiser:
    """Exact denoiser of Gaussian data u_0 ~ N_B(m, S) (docs/math.md §7.1).

    x0_hat = m + (alpha S / v)(u_t - alpha m), eps_hat = (sigma / v)(u_t - alpha m), with
    v = alpha^2 S + sigma^2 per frequency. ``spectrum`` S: (H, W, C) in the data basis;
    ``mean``: pixel-space (H, W, C) or None.
    """
    basis = _data_basis(process, basis)
    spec = check_spectrum(spectrum, basis)
    shape = _check_image(process, spec.shape)
    spec_j = jnp.asarray(spec, jnp.float32)
    mean_j = _as_jax(_spectral_mean(mean, shape, basis))

    def denoiser(x_t, t, *, key=None) -> Prediction:
        del key
        alpha, sigma = process.marginal(t)
        resid = bases.to_spectral(x_t, basis) - alpha * mean_j
        var = alpha**2 * spec_j + sigma**2
        x0 = mean_j + (alpha * spec_j / var) * resid
        eps = (sigma / var) * resid
        return Prediction(bases.from_spectral(x0, basis), bases.from_spectral(eps, basis))

    return jax.jit(denoiser)


def _mixture_denoiser(process, log_weights, means_u, variances, basis, chunk) -> Denoiser:
    """Posterior of a mixture of N_B(mu_m, S_m) with an online (chunked) softmax over components."""
    num = means_u.shape[0]
    chunk = max(1, min(int(chunk), num))
    pad = -num % chunk
    log_weights = np.concatenate([log_weights, np.full(pad, -np.inf)])
    means_u = np.concatenate([means_u, np.zeros((pad,) + means_u.shape[1:], means_u.dtype)])
    variances = np.concatenate([variances, np.ones((pad,) + variances.shape[1:])])
    blocks = (
        jnp.asarray(log_weights, jnp.float32).reshape(-1, chunk),
        _as_jax(means_u).reshape((-1, chunk) + means_u.shape[1:]),
        jnp.asarray(variances, jnp.float32).reshape((-1, chunk) + variances.shape[1:]),
    )

    def denoiser(x_t, t, *, key=None) -> Prediction:
        del key
        alpha, sigma = process.marginal(t)
        batch = x_t.shape[0]
        alpha = jnp.reshape(alpha, (batch, 1) + jnp.shape(alpha)[-3:]) if jnp.ndim(alpha) == 4 else alpha
        sigma = jnp.reshape(sigma, (batch, 1) + jnp.shape(sigma)[-3:]) if jnp.ndim(sigma) == 4 else sigma
        u = bases.to_spectral(x_t, basis)[:, None]

        def step(carry, block):
            run_max, total, acc_x0, acc_eps = carry
            log_w, mu, var_m = block
            var = jnp.maximum(alpha**2 * var_m + sigma**2, _VAR_FLOOR)  # (B, K, H, W, C)
            resid = u - alpha * mu
            quad = jnp.sum(jnp.real(resid * jnp.conj(resid)) / var + jnp.log(var), axis=(2, 3, 4))
            logits = log_w - 0.5 * quad  # (B, K)
            new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
            scale = jnp.exp(run_max - new_max)
            prob = jnp.exp(logits - new_max[:, None])[:, :, None, None, None]
            acc_x0 = acc_x0 * scale[:, None, None, None] + jnp.sum(
                prob * (mu + (alpha * var_m / var) * resid), axis=1
            )
            acc_eps = acc_eps * scale[:, None, None, None] + jnp.sum(prob * (sigma / var) * resid, axis=1)
            total = total * scale + jnp.sum(prob[:, :, 0, 0, 0], axis=1)
            return (new_max, total, acc_x0, acc_eps), None

        zeros = jnp.zeros(u.shape[:1] + u.shape[2:], u.dtype)
        init = (jnp.full((batch,), -jnp.inf), jnp.zeros((batch,)), zeros, zeros)
        if blocks[0].shape[0] == 1:  # one chunk: no loop
            (_, total, acc_x0, acc_eps), _ = step(init, tuple(b[0] for b in blocks))
        else:
            (_, total, acc_x0, acc_eps), _ = jax.lax.scan(step, init, blocks)
        norm = total[:, None, None, None]
        return Prediction(
            bases.from_spectral(acc_x0 / norm, basis), bases.from_spectral(acc_eps / norm, basis)
        )

    return jax.jit(denoiser)


def gmm_denoiser(
    process: Process, weights, means, variances, *, basis: str | None = None, chunk: int = 64
) -> Denoiser:
    """Exact denoiser of a Gaussian mixture sum_m pi_m N_B(mu_m, S_m) (docs/math.md §7.2).

    weights: (M,) positive (normalised here); means: pixel-space (M, H, W, C); variances: S_m per
    frequency in the data basis, broadcastable to (M, H, W, C) ((M,) = isotropic components,
    zeros allowed). Components are processed ``chunk`` at a time.
    """
    basis = _data_basis(process, basis)
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    if means.ndim != 4 or weights.shape != (means.shape[0],):
        raise ValueError(
            f"means must have shape (M, H, W, C) and weights (M,); got {means.shape} and {weights.shape}"
        )
    if not (np.all(np.isfinite(weights)) and np.all(weights > 0)):
        raise ValueError("mixture weights must be finite and > 0")
    _check_image(process, means.shape[1:])
    variances = np.asarray(variances, np.float64)
    if variances.ndim == 1:
        variances = variances.reshape(-1, 1, 1, 1)
    try:
        variances = np.broadcast_to(variances, means.shape).copy()
    except ValueError as err:
        raise ValueError(f"variances of shape {variances.shape} do not broadcast to {means.shape}") from err
    if not (np.all(np.isfinite(variances)) and np.all(variances >= 0)):
        raise ValueError("mixture variances must be finite and >= 0")
    means_u = bases.to_spectral_np(means, basis)
    return _mixture_denoiser(process, np.log(weights / weights.sum()), means_u, variances, basis, chunk)


def finite_set_denoiser(process: Process, points, *, chunk: int = 64) -> Denoiser:
    """Ideal denoiser of the finite data set ``points`` (M, H, W, C), pixel space (docs/math.md §7.3).

    w_i = softmax_i(-1/2 sum_k |u_t(k) - alpha_k u^(i)(k)|^2 / sigma_k^2), x0_hat = sum_i w_i x^(i),
    evaluated in the process's basis (pixels for scalar processes), ``chunk`` points at a time.
    """
    points = np.asarray(points, np.float64)
    if points.ndim != 4 or points.shape[0] < 1:
        raise ValueError(f"points must have shape (M, H, W, C) with M >= 1; got {points.shape}")
    basis = _data_basis(process, None)
    return gmm_denoiser(
        process, np.ones(points.shape[0]), points, np.zeros(points.shape[0]), basis=basis, chunk=chunk
    )


# ---------------------------------------------------------------------------------------------
# exact laws of linear samplers on the Gaussian testbed
# ---------------------------------------------------------------------------------------------


class _Affine:
    """const + sum_j coefs[j] * xi_j per frequency, xi_j independent with E|xi_j|^2 = 1.

    ``coefs`` has one row per source (row 0: the starting state, row j + 1: the noise of step j).
    """

    __array_ufunc__ = None  # make NumPy defer ``array * form`` to __rmul__

    def __init__(self, const, coefs: np.ndarray):
        self.const, self.coefs = const, coefs

    def __add__(self, other):
        if isinstance(other, _Affine):
            return _Affine(self.const + other.const, self.coefs + other.coefs)
        return _Affine(self.const + other, self.coefs)

    __radd__ = __add__

    def __mul__(self, scale):
        return _Affine(scale * self.const, scale * self.coefs)

    __rmul__ = __mul__

    def __sub__(self, other):
        return self + (-1.0) * other

    def __rsub__(self, other):
        return (-1.0) * self + other


def _unit(index: int, num_sources: int, ndim: int) -> np.ndarray:
    """Row ``index`` of the identity over sources, shaped to broadcast against (sources, H, W, C)."""
    return (np.arange(num_sources) == index).astype(np.float64).reshape((num_sources,) + (1,) * ndim)


class _GaussianOps:
    """predict / noise / cond for the affine propagation with the Gaussian denoiser."""

    projection = None

    def __init__(self, c, step, spectrum, mean_u, num_sources, noisy):
        self.c, self.step, self.spectrum, self.mean_u = c, step, spectrum, mean_u
        self.num_sources, self.noisy = num_sources, noisy

    def predict(self, u, level) -> Spectral:
        alpha, sigma = self.c["alpha_" + level], self.c["sigma_" + level]
        var = alpha**2 * self.spectrum + sigma**2
        resid = u - alpha * self.mean_u
        x0 = self.mean_u + (alpha * self.spectrum / var) * resid
        return Spectral(x0, (sigma / var) * resid, x0)

    def noise(self):
        if not self.noisy:
            return 0.0
        return _Affine(0.0, _unit(self.step + 1, self.num_sources, np.ndim(self.spectrum)))

    @staticmethod
    def cond(flag, true_fn, false_fn):
        return true_fn() if flag else false_fn()


def propagate_law(method: str, tables: dict, spectrum, mean_u, start_mean, start_std, *, noisy: bool):
    """(const, coefs) of the sampler output u_out = const + sum_j coefs[j] xi_j (docs/math.md §7.1).

    Runs ``method``'s update (the code :func:`spd_jax.diffusion.samplers.sample` scans) on affine
    forms with the exact Gaussian denoiser; works on NumPy float64 tables and on JAX tables
    (differentiable, used by :mod:`spd_jax.diffusion.tune`). Tables need ``alpha_cur``,
    ``sigma_cur``, ``alpha_next``, ``sigma_next`` and the method's coefficients, one row per step
    (a boolean ``second`` only for Heun). Sources: row 0 the standardised start, row j + 1 the unit
    noise of step j (only when ``noisy``).
    """
    steps = int(np.shape(tables["alpha_cur"])[0])
    num_sources = steps + 1 if noisy else 1
    coefs = start_std * _unit(0, num_sources, np.ndim(spectrum))
    state = (_Affine(start_mean, coefs), initial_cache(tables, 0.0))
    update = UPDATES[method]
    for j in range(steps):
        row = {name: table[j] for name, table in tables.items()}
        state = update(state, row, _GaussianOps(row, j, spectrum, mean_u, num_sources, noisy))
    out = state[0]
    return out.const, out.coefs


class LinearLaw(NamedTuple):
    """Exact output law per frequency (data basis): u_out = mean + sum_j gains[j] xi_j.

    mean: (H, W, C) (complex for the DFT); var: (H, W, C) = E|u_out - mean|^2; gains: source ->
    (H, W, C) coefficients, sources "start" (the standardised starting state) and step indices j
    (the step's unit noise); data_mean: the data's mean in the same basis; grid: the t levels.
    """

    mean: np.ndarray
    var: np.ndarray
    gains: dict
    data_mean: np.ndarray
    grid: np.ndarray


def sampler_law(
    process: Process,
    spectrum,
    *,
    method: str,
    num_steps: int,
    mean=None,
    basis: str | None = None,
    start="exact",
    grid=None,
    **knobs,
) -> LinearLaw:
    """Exact law of ``sample(gaussian_denoiser(process, spectrum, mean), ...)`` with clip_x0 off.

    ``start``: "exact" (the true marginal at the first grid level, Var = alpha^2 S + sigma^2),
    "prior" (the sampler prior N_B(0, sigma_1^2) of ``process.prior_sample``) or a pair
    (mean, var) of per-frequency arrays. A trained projection (``predict_project``) is not linear
    and is refused.
    """
    if knobs.get("projection") is not None:
        raise ValueError("sampler_law needs the default (Tweedie) projection; a trained one is not linear")
    if np.any(np.asarray(knobs.get("time_shift", 0.0)) != 0):
        raise ValueError("sampler_law evaluates the exact denoiser at each step's own level; a nonzero "
                         f"time_shift ({knobs['time_shift']!r}) is a correction for trained networks")
    basis = _data_basis(process, basis)
    spec = check_spectrum(spectrum, basis)
    shape = _check_image(process, spec.shape)
    mean_u = _spectral_mean(mean, shape, basis)
    run = plan(process, method=method, num_steps=num_steps, grid=grid, **knobs)
    if isinstance(start, str):
        if start == "exact":
            alpha, sigma = process.marginal64(run.grid[:1])
            start_mean, start_var = alpha[0] * mean_u, alpha[0] ** 2 * spec + sigma[0] ** 2
        elif start == "prior":
            _, sigma = process.marginal64(np.ones(1))
            start_mean, start_var = np.zeros(shape), np.broadcast_to(sigma[0] ** 2, shape)
        else:
            raise ValueError(f"start must be 'exact', 'prior' or a (mean, var) pair; got {start!r}")
    else:
        start_mean, start_var = (np.broadcast_to(np.asarray(a), shape) for a in start)
    const, coefs = propagate_law(run.method, run.tables, spec, mean_u, start_mean, np.sqrt(start_var),
                                 noisy=run.noisy)
    coefs = np.broadcast_to(coefs, (coefs.shape[0],) + shape)
    gains = {"start": coefs[0]}
    if run.noisy:
        gains.update({j: coefs[j + 1] for j in range(run.num_steps)})
    return LinearLaw(np.broadcast_to(const, shape), np.sum(coefs**2, axis=0), gains, mean_u, run.grid)


def gaussian_kl(law_mean, law_var, spectrum, data_mean=None) -> float:
    """KL(N_B(M, V) || N_B(m, S)) in nats, summed over all frequencies (docs/math.md §7.1)."""
    ratio = np.asarray(law_var, np.float64) / np.asarray(spectrum, np.float64)
    diff = np.asarray(law_mean) - (0.0 if data_mean is None else np.asarray(data_mean))
    return float(0.5 * np.sum(ratio - 1.0 - np.log(ratio) + np.abs(diff) ** 2 / spectrum))


def gaussian_w2(law_mean, law_var, spectrum, data_mean=None) -> float:
    """Wasserstein-2 distance between N_B(M, V) and N_B(m, S) (pixel units, docs/math.md §7.1)."""
    diff = np.asarray(law_mean) - (0.0 if data_mean is None else np.asarray(data_mean))
    sq = np.sum((np.sqrt(law_var) - np.sqrt(spectrum)) ** 2 + np.abs(diff) ** 2)
    return float(np.sqrt(sq))
