"""Samplers for every Gaussian process diagonal in a spectral basis (docs/math.md §0, §6).

One entry point::

    x, info = sample(denoiser, process, method=..., num_steps=N, key=key, shape=(B, H, W, C),
                     clip_x0=False, **knobs)

Every method works per frequency on spectral coefficients u = B x (the identity basis for
frequency-independent processes), with coefficient tables precomputed in float64 NumPy (see
:func:`plan`), cast once to float32, and applied in ONE jit-compiled ``jax.lax.scan`` over the
grid. The denoiser sees pixel-space x_t = B^-1 u and continuous t of shape (B,).

Methods (knobs; docs/math.md section):

* ``ancestral`` (``variance`` = "posterior" | "fixed_large"; §6.1): posterior step (1.3).
* ``ddim`` (``eta`` in [0, 1]; §6.2). eta = 1 equals ``ancestral``.
* ``gradient_estimation`` (``gamma``, ``mu`` in [0, 1); §6.3), VE form per frequency; the first
  step uses the plain eps. (gamma, mu) = (1, 0) is DDIM, (1, 1/2) ancestral.
* ``ddm_bridge`` (``stochastic``, ``c_correction``; §6.4): the DDM/ADM bridge step written per
  frequency, u_s = u_t + (alpha_s - alpha_t)(-c_hat) + ((sigma_s^2 - sigma_t^2)/sigma_t) eps_hat
  + sigma_s sqrt(1 - sigma_s^2/sigma_t^2) z (the official form for ``ddm_constant``; an
  extension for other processes); deterministic: u_s = x0_hat + (1 - alpha_s) c_hat + sigma_s
  eps_hat. With the c-correction (default) c_hat := -clip(x0_hat), else the denoiser's raw ``c``
  (or -x0_hat if it has none); with ``clip_x0`` only c_hat is clipped, eps_hat is kept (official).
  The same method runs DDM's linear attenuation (:class:`~spd_jax.diffusion.processes.DDMLinearProcess`,
  §2.6b) with the denoiser's slope a: u_s = u_t + H_s - H_t - (s'/sqrt(t)) eps_hat + noise, where
  H_t = a t^2/2 + c t, a_hat clipped to [-1, 1] and the raw c_hat (no c-correction); deterministic:
  u_s = x0_hat + H_s + sqrt(s) eps_hat. It is the only method for that process.
* ``dpm_solver_pp`` (``order`` in {1, 2, 3}, ``lower_order_final``, ``extrapolation``; §6.7b):
  DPM-Solver++(2M), data prediction, the exponential-integrator step written in each
  frequency's own half log-SNR lambda_t(k) = log(alpha_t(k) / sigma_t(k)):
  u_s = (sigma_s/sigma_t) u_t + alpha_s (1 - e^-h) D, h = lambda_s - lambda_t, with
  D = x0_hat + (w / (2 r)) (x0_hat - x0_hat_prev), r = h_prev / h, w = ``extrapolation``
  (1 = the published 2M update, 0 = first order = DDIM); the first step is first order, and so
  is the last with ``lower_order_final`` (always when it goes to zero noise, where h = inf).
  ``order=3`` is DPM-Solver++(3M): from the third step on, D also carries a second difference of
  the two earlier x0_hat (the cache holds both), with the step before the last at most second
  order under ``lower_order_final``.
* ``heun`` (§6.5): Heun on the probability-flow ODE in VE form, Euler on the last step to
  zero noise (NFE 2N - 1).
* ``predict_project`` (``kappa``, ``projection``; §6.6): Euler-Maruyama predict step on the
  reverse SDE, then u <- u_pred + kappa T(u_pred); default T is the training-free Tweedie
  surrogate (2/(2 + sqrt(beta)))(alpha_t' x0_hat(u_pred, t') - u_pred), beta = g^2(t) dt per
  frequency (NFE 2N). A trained ``projection(x, t) -> T`` (pixel space) costs N aux calls;
  kappa = 0 without one is plain Euler-Maruyama: the surrogate is never evaluated (NFE N).
* ``smd`` (§6.7): the ancestral step with a stochastic denoiser; the denoiser receives
  ``key=`` a batch of per-example latent keys (shape (B,) for typed keys, (B, 2) for raw uint32
  keys; row b belongs to global example ``index[b]``) and should draw example b's latent from row b.

``ddim``, ``gradient_estimation`` and ``dpm_solver_pp`` also take ``time_shift`` (0 by default; a
number or one per step): step i calls the network at t_i exp(s_i), capped at 1, while its
coefficients keep t_i (:func:`network_times`; tuned on a trained model by
:func:`spd_jax.diffusion.tune.tune_to_teacher`, docs/math.md §6.8).

Conventions: t_max = 1 - 1e-3 and a last level at t = 0, where every method returns x0_hat (GE and
Heun take their update to sigma = 0; predict_project ends with a noise-free predict-project step
to t = 0). With ``clip_x0`` x0_hat is clipped to [-1, 1] in pixel space and eps_hat recomputed
from it (except ``ddm_bridge``, see above).

Randomness (docs/math.md §0): the noise of example i at step j is normal(fold_in(fold_in(key, i), j))
in pixel space, then transformed; the prior draw is ``process.prior_sample(key, shape, index)``;
the latent key of example i at step j (``smd``) is fold_in(fold_in(key, i), LATENT_STEP_OFFSET + j).
Pass ``index`` (global example indices) to split a batch into chunks with identical results.

``project(x, t_next, key, step, index) -> x`` (optional, pixel space) is applied after every step,
e.g. the known-pixel projection of inpainting (:func:`spd_jax.tasks.known_pixel_projection`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.diffusion import bases, grids
from spd_jax.diffusion.parameterization import Prediction
from spd_jax.diffusion.processes import DDMLinearProcess, Process, check_name
from spd_jax.diffusion.rng import example_index, example_keys, per_example_normal

METHODS = (
    "ancestral",
    "ddim",
    "gradient_estimation",
    "ddm_bridge",
    "heun",
    "predict_project",
    "smd",
    "dpm_solver_pp",
)

#: grid used when ``grid=None``
DEFAULT_GRIDS = {
    "ancestral": "uniform_t",
    "ddim": "uniform_t",
    "gradient_estimation": "log_linear",
    "ddm_bridge": "adm",
    "heun": "karras",
    "predict_project": "uniform_t",
    "smd": "uniform_t",
    "dpm_solver_pp": "log_linear",
}

#: method knobs and their defaults
KNOBS = {
    "ancestral": {"variance": "posterior"},
    "ddim": {"eta": 0.0, "time_shift": 0.0},
    "gradient_estimation": {"gamma": 2.0, "mu": 0.0, "time_shift": 0.0},
    "ddm_bridge": {"stochastic": True, "c_correction": True},
    "heun": {},
    "predict_project": {"kappa": 0.5, "projection": None},
    "smd": {"variance": "posterior"},
    "dpm_solver_pp": {"order": 2, "lower_order_final": True, "extrapolation": 1.0, "time_shift": 0.0},
}

#: knobs that may also be given per step (a sequence of num_steps values; e.g. tuned weights)
PER_STEP_KNOBS = {"ddim": ("eta", "time_shift"), "gradient_estimation": ("gamma", "time_shift"),
                  "dpm_solver_pp": ("extrapolation", "time_shift")}

LATENT_STEP_OFFSET = 1 << 30  #: step offset of the per-example latent keys given to ``smd`` denoisers

_DERIVATIVE_STEP = 1e-5  # central-difference step for f = dlog(alpha)/dt and dsigma^2/dt (float64)


class Plan(NamedTuple):
    """A sampler run precomputed in float64 (docs/math.md §6.0).

    grid: (S + 1,) t levels, noisiest first; tables: name -> (S, ...) arrays, one row per step
    (``t_cur``, ``t_next``, ``alpha_cur``, ``sigma_cur``, ``alpha_next``, ``sigma_next`` and the
    method's coefficients; per-frequency arrays (S, H, W, C) or (S, 1, 1, 1) for scalar
    processes); noisy: whether any step adds noise; nfe, aux_nfe: the honest call counts.
    """

    method: str
    grid: np.ndarray
    tables: dict
    noisy: bool
    nfe: int
    aux_nfe: int

    @property
    def num_steps(self) -> int:
        return self.grid.size - 1


class Spectral(NamedTuple):
    """A denoiser output in the sampler's basis: x0_hat, eps_hat, -c_hat (= x0_hat unless raw c) and
    the linear-attenuation slope a_hat (None for Gaussian processes)."""

    x0: Any
    eps: Any
    neg_c: Any
    a: Any = None


# ---------------------------------------------------------------------------------------------
# per-step updates, shared by the JAX scan and the float64 analysis in spd_jax.diffusion.analytic.
# ``state`` = (u, eps_prev); ``c`` = this step's table row; ``ops`` supplies predict(u, level),
# noise(), cond(flag, f, g) and projection (None or u -> T(u)). Only +, -, and products with
# table entries act on u, so the same code propagates exact Gaussian laws.
# ---------------------------------------------------------------------------------------------


def _ancestral_update(state, c, ops):
    u, eps_prev = state
    x0 = ops.predict(u, "cur").x0
    return c["a_u"] * u + c["a_0"] * x0 + c["a_z"] * ops.noise(), eps_prev


def _ddim_update(state, c, ops):
    u, eps_prev = state
    pred = ops.predict(u, "cur")
    return c["a_0"] * pred.x0 + c["a_e"] * pred.eps + c["a_z"] * ops.noise(), eps_prev


def _ge_update(state, c, ops):
    u, eps_prev = state
    eps = ops.predict(u, "cur").eps
    eps_bar = c["gamma"] * eps + (1.0 - c["gamma"]) * eps_prev
    return c["a_u"] * u + c["a_e"] * eps_bar + c["a_z"] * ops.noise(), eps


def _dpm_update(state, c, ops):
    u, cache = state  # the cache slot holds the previous x0_hat (3M: the previous two)
    x0 = ops.predict(u, "cur").x0
    if "extrap2" in c:  # order 3
        x0_prev, x0_prev2 = cache
        d = x0 + c["extrap"] * (x0 - x0_prev) + c["extrap2"] * (x0_prev - x0_prev2)
        return c["a_u"] * u + c["a_0"] * d, (x0, x0_prev)
    d = x0 + c["extrap"] * (x0 - cache)
    return c["a_u"] * u + c["a_0"] * d, x0


def initial_cache(tables: dict, zero):
    """The update's cache slot before the first step: ``zero`` (a zero array, or 0.0 for the exact
    law), or a pair of them for DPM-Solver++(3M), which keeps two earlier x0_hat."""
    return (zero, zero) if "extrap2" in tables else zero


def _bridge_update(state, c, ops):
    u, eps_prev = state
    pred = ops.predict(u, "cur")
    mean = c["a_u"] * u + c["a_0"] * pred.x0 + c["a_c"] * pred.neg_c + c["a_e"] * pred.eps
    if "a_a" in c:  # DDM linear attenuation: the slope's share of H_s - H_t
        mean = mean + c["a_a"] * pred.a
    return mean + c["a_z"] * ops.noise(), eps_prev


def _heun_update(state, c, ops):
    u, eps_prev = state
    eps = ops.predict(u, "cur").eps
    euler = c["a_u"] * u + c["a_e"] * eps

    def corrected():
        eps_next = ops.predict(euler, "next").eps
        return c["a_u"] * u + c["a_e"] * (0.5 * (eps + eps_next))

    return ops.cond(c["second"], corrected, lambda: euler), eps_prev


def _no_projection(x, t):
    """predict_project's T at kappa = 0 without a trained projection: nothing to evaluate."""
    return jnp.zeros_like(x)


def _pp_projection(knobs: dict):
    """The projection ``predict_project`` runs for ``knobs``: the trained one, :func:`_no_projection`
    at kappa = 0 without one, else None (the Tweedie surrogate)."""
    projection = knobs.get("projection")
    if projection is None and knobs.get("kappa", KNOBS["predict_project"]["kappa"]) == 0:
        return _no_projection
    return projection


def _pp_update(state, c, ops):
    u, eps_prev = state
    eps = ops.predict(u, "cur").eps
    u_pred = c["p_u"] * u + c["p_e"] * eps
    if ops.projection is None:
        direction = c["shrink"] * (c["alpha_next"] * ops.predict(u_pred, "next").x0 - u_pred)
    else:
        direction = ops.projection(u_pred)
    return u_pred + c["kappa"] * direction + c["a_z"] * ops.noise(), eps_prev


UPDATES = {
    "ancestral": _ancestral_update,
    "ddim": _ddim_update,
    "gradient_estimation": _ge_update,
    "ddm_bridge": _bridge_update,
    "heun": _heun_update,
    "predict_project": _pp_update,
    "smd": _ancestral_update,
    "dpm_solver_pp": _dpm_update,
}


# ---------------------------------------------------------------------------------------------
# float64 coefficient tables
# ---------------------------------------------------------------------------------------------


def _ve_levels(a_cur, s_cur, a_next, s_next, final_zero):
    """VE levels sigma/alpha per step; the last step to t = 0 goes to sigma = 0 with alpha = 1."""
    a_next = a_next.copy()
    ve_cur, ve_next = s_cur / a_cur, s_next / a_next
    if final_zero:
        a_next[-1], ve_next[-1] = 1.0, 0.0
    return ve_cur, ve_next, a_next


def _schedule_derivatives(process: Process, t: np.ndarray):
    """(f, g^2) = (dlog alpha/dt, dsigma^2/dt - 2 f sigma^2) at times t (docs/math.md §1.2), float64."""
    lo = np.clip(t - _DERIVATIVE_STEP, 0.0, 1.0)
    hi = np.clip(t + _DERIVATIVE_STEP, 0.0, 1.0)
    step = (hi - lo).reshape((-1,) + (1,) * 3)
    a_lo, s_lo = process.marginal64(lo)
    a_hi, s_hi = process.marginal64(hi)
    _, sigma = process.marginal64(t)
    f = (np.log(a_hi) - np.log(a_lo)) / step
    g2 = (s_hi**2 - s_lo**2) / step - 2.0 * f * sigma**2
    return f, np.maximum(g2, 0.0)


#: methods whose coefficient tables :func:`linear_tables` builds with NumPy or JAX (the tuner
#: differentiates through them, :mod:`spd_jax.diffusion.tune`)
TABLE_METHODS = ("ancestral", "smd", "ddim", "gradient_estimation", "dpm_solver_pp")


def _safe_sqrt(x, xp):
    """sqrt(x) for x >= 0 with a zero (not NaN) gradient where x = 0."""
    positive = x > 0
    return xp.where(positive, xp.sqrt(xp.where(positive, x, 1.0)), 0.0)


def _per_step(value, steps, xp):
    """A scalar or per-step knob as a (steps, 1, 1, 1) float column."""
    value = xp.asarray(value, dtype=float)
    return xp.broadcast_to(value.reshape(-1, 1, 1, 1), (steps, 1, 1, 1))


def linear_tables(method: str, alpha, sigma, knobs: dict, *, final_zero: bool, xp=np) -> dict:
    """Coefficient tables of ``method`` (one of :data:`TABLE_METHODS`) from the levels' (alpha,
    sigma) of shape (S + 1, ...), in NumPy float64 or (``xp=jax.numpy``) differentiably in JAX.

    ``knobs`` are the resolved method knobs (per-step ones as scalars or (S,) sequences);
    ``final_zero``: the last level is t = 0 (alpha, sigma there are not used: the final step
    returns x0_hat, or takes GE's update to sigma = 0).
    """
    a_cur, s_cur, a_next, s_next = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    steps = a_cur.shape[0]
    last = (np.arange(steps) == steps - 1).reshape((-1, 1, 1, 1))
    first = (np.arange(steps) == 0).reshape((-1, 1, 1, 1))
    final_mask = last & final_zero
    # safe values at the final zero-noise level (overridden below; keeps JAX gradients finite)
    a_next = xp.where(final_mask, 1.0, a_next)
    s_next = xp.where(final_mask, 0.0, s_next)

    def final(value, override):
        return xp.where(final_mask, override, value)

    if method in ("ancestral", "smd", "ddim"):
        a_ts = a_cur / a_next
        var_ts = xp.maximum(s_cur**2 - a_ts**2 * s_next**2, 0.0)
        post_var = var_ts * s_next**2 / s_cur**2
        if method == "ddim":
            noise = _per_step(knobs["eta"], steps, xp) * _safe_sqrt(post_var, xp)
            return {
                "a_0": final(a_next, 1.0),
                "a_e": final(_safe_sqrt(s_next**2 - noise**2, xp), 0.0),
                "a_z": final(noise, 0.0),
            }
        std = _safe_sqrt(post_var if knobs["variance"] == "posterior" else var_ts, xp)
        return {
            "a_u": final(a_ts * s_next**2 / s_cur**2, 0.0),
            "a_0": final(a_next * var_ts / s_cur**2, 1.0),
            "a_z": final(std, 0.0),
        }
    if method == "gradient_estimation":
        mu = knobs["mu"]
        ve_cur, ve_next = s_cur / a_cur, final(s_next / a_next, 0.0)
        if mu == 0:
            ve_mid = ve_next
        else:
            positive = ve_next > 0
            log_mid = (xp.log(xp.where(positive, ve_next, 1.0)) - mu * xp.log(ve_cur)) / (1.0 - mu)
            ve_mid = xp.where(positive, xp.exp(log_mid), 0.0)
        gamma = xp.where(first, 1.0, _per_step(knobs["gamma"], steps, xp))  # no cached eps at step 0
        return {
            "a_u": a_next / a_cur,
            "a_e": -a_next * (ve_cur - ve_mid),
            "a_z": a_next * _safe_sqrt(ve_next**2 - ve_mid**2, xp),
            "gamma": gamma,
        }
    if method == "dpm_solver_pp":
        s_safe = xp.where(final_mask, 1.0, s_next)
        h = (xp.log(a_next) - xp.log(s_safe)) - (xp.log(a_cur) - xp.log(s_cur))  # lambda_s - lambda_t > 0
        h_prev = xp.concatenate([h[:1], h[:-1]], axis=0)
        second = ~first
        if knobs["lower_order_final"]:
            second = second & ~last
        second = second & ~final_mask
        order = int(knobs["order"])
        weight = _per_step(knobs["extrapolation"], steps, xp) * (1.0 if order > 1 else 0.0)
        phi1 = -xp.expm1(-h)  # 1 - e^-h
        tables = {"a_u": final(s_next / s_cur, 0.0), "a_0": final(a_next * phi1, 1.0)}
        if order < 3:
            tables["extrap"] = xp.where(second, weight * h / (2.0 * h_prev), 0.0)
            return tables
        # 3M: D = x0 + e1 (x0 - x0_prev) + e2 (x0_prev - x0_prev2), from step 3 on (and not on the
        # last two steps with lower_order_final); r0 = h_prev / h, r1 = h_prev2 / h
        index = np.arange(steps).reshape((-1, 1, 1, 1))
        third = second & (index >= 2)
        if knobs["lower_order_final"]:
            third = third & (index != steps - 2)
        h_safe = xp.where(final_mask, 1.0, h)
        h_prev2 = xp.concatenate([h[:2], h[:-2]], axis=0)
        r0, r1 = h_prev / h_safe, h_prev2 / h_safe
        phi1_safe = xp.where(final_mask, 1.0, phi1)
        g2 = (1.0 - phi1_safe / h_safe) / phi1_safe  # phi2 / phi1, phi2 = (e^-h - 1)/h + 1
        g3 = ((h_safe - phi1_safe) / h_safe**2 - 0.5) / phi1_safe  # phi3 / phi1, phi3 = (e^-h - 1 + h)/h^2 - 1/2
        e1 = g2 * (1.0 / r0 + 1.0 / (r0 + r1)) - g3 / (r0 * (r0 + r1))
        e2 = -g2 * r0 / ((r0 + r1) * r1) + g3 / (r1 * (r0 + r1))
        tables["extrap"] = xp.where(third, weight * e1, xp.where(second, weight * h / (2.0 * h_prev), 0.0))
        tables["extrap2"] = xp.where(third, weight * e2, 0.0)
        return tables
    raise AssertionError(method)


def network_times(t_cur, time_shift, xp=np):
    """The time each step's network call sees: t_cur exp(time_shift) (per step), at most 1.

    ``time_shift`` (a knob of the deterministic samplers, 0 by default) decouples the network's
    time input from the level the step's coefficients use; a tuned shift corrects a trained
    network's bias at few steps (:func:`spd_jax.diffusion.tune.tune_to_teacher`)."""
    steps = t_cur.shape[0]
    return xp.minimum(t_cur * xp.exp(xp.reshape(_per_step(time_shift, steps, xp), (steps,))), 1.0)


def _method_tables(process, method, grid, levels, knobs):
    a_all, s_all = levels
    a_cur, s_cur, a_next, s_next = a_all[:-1], s_all[:-1], a_all[1:], s_all[1:]
    final_zero = grid[-1] == 0.0
    steps = grid.size - 1
    last = np.arange(steps) == steps - 1

    def final(value, override):
        return np.where(last.reshape((-1, 1, 1, 1)) & final_zero, override, value)

    if method in TABLE_METHODS:
        return linear_tables(method, a_all, s_all, knobs, final_zero=bool(final_zero))
    if method == "heun":
        ve_cur, ve_next, a_eff = _ve_levels(a_cur, s_cur, a_next, s_next, final_zero)
        return {
            "a_u": a_eff / a_cur,
            "a_e": a_eff * (ve_next - ve_cur),
            "second": ~(last & final_zero),
        }
    if method == "ddm_bridge":
        ones, zeros = np.ones_like(s_cur), np.zeros_like(s_cur)
        if knobs["stochastic"]:
            table = {
                "a_u": ones,
                "a_0": zeros,
                "a_c": a_next - a_cur,
                "a_e": (s_next**2 - s_cur**2) / s_cur,
                "a_z": s_next * np.sqrt(np.maximum(1.0 - s_next**2 / s_cur**2, 0.0)),
            }
        else:
            table = {"a_u": zeros, "a_0": ones, "a_c": -(1.0 - a_next), "a_e": s_next, "a_z": zeros}
        overrides = {"a_u": 0.0, "a_0": 1.0, "a_c": 0.0, "a_e": 0.0, "a_z": 0.0}
        return {name: final(value, overrides[name]) for name, value in table.items()}
    if method == "predict_project":
        f, g2 = _schedule_derivatives(process, grid[:-1])
        dt = (grid[:-1] - grid[1:]).reshape((-1, 1, 1, 1))
        beta = g2 * dt
        return {
            "p_u": 1.0 - f * dt,
            "p_e": -beta / s_cur,
            "shrink": 2.0 / (2.0 + np.sqrt(beta)),
            "kappa": np.full((steps, 1, 1, 1), float(knobs["kappa"])),
            "a_z": final(np.sqrt(beta), 0.0),
        }
    raise AssertionError(method)


def _slope_table(grid: np.ndarray, *, stochastic: bool) -> np.ndarray:
    """Coefficient of a_hat in DDM's linear bridge (docs/math.md §6.4): (t_next^2 - t^2)/2 for the
    stochastic step (from H_s - H_t), t_next^2/2 for the deterministic one (from H_s); 0 on a last
    step to t = 0, which returns x0_hat."""
    t, t_next = grid[:-1], grid[1:]
    table = 0.5 * (t_next**2 - t**2) if stochastic else 0.5 * t_next**2
    if grid[-1] == 0.0:
        table = table.copy()
        table[-1] = 0.0
    return table.reshape((-1, 1, 1, 1))


def resolve_knobs(method: str, grid, knobs: dict) -> tuple[dict, dict]:
    """Split ``knobs`` into (method knobs with defaults, grid options); reject unknown names."""
    grid_options = grids.GRID_OPTIONS[check_name(grid, grids.GRIDS, "grid")] if isinstance(grid, str) else ()
    valid = tuple(KNOBS[method]) + tuple(grid_options)
    for name in knobs:
        check_name(name, valid, f"option of method {method!r}" + (f" with grid {grid!r}" if grid_options else ""))
    method_knobs = {name: knobs.get(name, default) for name, default in KNOBS[method].items()}
    grid_kw = {name: knobs[name] for name in grid_options if name in knobs}
    for name in PER_STEP_KNOBS.get(method, ()):
        value = np.asarray(method_knobs[name], np.float64)
        if value.ndim > 1 or not np.all(np.isfinite(value)):
            raise ValueError(f"{method} {name} must be a finite number or a 1-D sequence of one per step; "
                             f"got {method_knobs[name]!r}")
        method_knobs[name] = float(value) if value.ndim == 0 else value
    if method == "ddim" and not np.all((0.0 <= method_knobs["eta"]) & (method_knobs["eta"] <= 1.0)):
        raise ValueError(f"ddim eta must be in [0, 1]; got {method_knobs['eta']}")
    if method == "gradient_estimation" and not 0.0 <= method_knobs["mu"] < 1.0:
        raise ValueError(f"gradient_estimation mu must be in [0, 1); got {method_knobs['mu']}")
    if method == "dpm_solver_pp":
        if method_knobs["order"] not in (1, 2, 3) or isinstance(method_knobs["order"], bool):
            raise ValueError(f"dpm_solver_pp order must be 1, 2 or 3; got {method_knobs['order']!r}")
        if not isinstance(method_knobs["lower_order_final"], (bool, np.bool_)):
            raise ValueError(f"dpm_solver_pp lower_order_final must be True or False; "
                             f"got {method_knobs['lower_order_final']!r}")
    if method in ("ancestral", "smd"):
        check_name(method_knobs["variance"], ("posterior", "fixed_large"), "ancestral variance")
    if method == "predict_project":
        if not method_knobs["kappa"] >= 0:
            raise ValueError(f"predict_project kappa must be >= 0; got {method_knobs['kappa']}")
        if method_knobs["projection"] is not None and not callable(method_knobs["projection"]):
            raise ValueError("predict_project projection must be a function projection(x, t) -> T")
    return method_knobs, grid_kw


def check_process(process, method: str | None = None) -> Process:
    """Raise a clear ValueError for processes the generic samplers cannot run; ``ddm_linear`` only
    with ``method="ddm_bridge"``."""
    if isinstance(process, DDMLinearProcess):
        if method != "ddm_bridge":
            raise ValueError(
                f"process 'ddm_linear' has a non-Gaussian offset term and runs only with its own bridge "
                f"step, method='ddm_bridge'; got method {method!r}"
            )
        return process
    if not isinstance(process, Process):
        name = getattr(process, "name", type(process).__name__)
        raise ValueError(
            f"process {name!r} is not a Gaussian process of form (1.1): ddm_linear has a "
            "non-Gaussian offset term and its own (a, C) head and bridge step, so the generic "
            "samplers refuse it"
        )
    if not process.gaussian_prior:
        raise ValueError(
            f"process {process.name!r} has a data-dependent prior (blurred training images, DC never "
            "noised): generic Gaussian-prior samplers refuse it; use its own residual sampler"
        )
    return process


def check_method(method: str) -> str:
    return check_name(method, METHODS, "sampling method")


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    return int(num_steps)


def _build_grid(process, method, num_steps, grid, grid_kw) -> np.ndarray:
    if grid is None:
        grid = DEFAULT_GRIDS[method]
    if isinstance(grid, str):
        return grids.make(grid, process, num_steps, **grid_kw)
    grid = grids.check_grid(grid)
    if grid.size - 1 != num_steps:
        raise ValueError(
            f"an explicit grid of {grid.size} levels has {grid.size - 1} steps, not num_steps={num_steps}"
        )
    return grid


def plan(process: Process, *, method: str, num_steps: int, grid=None, **knobs) -> Plan:
    """Precompute a sampler run in float64: grid, per-step coefficient tables and NFE.

    ``grid`` is a name from :data:`spd_jax.diffusion.grids.GRIDS` (default :data:`DEFAULT_GRIDS`), with grid
    options (``t_max``, ``sigma_end``, ``t_end``, ``rho``, ``sigma_start``) among ``knobs``, or an
    explicit array of ``num_steps + 1`` decreasing t levels. The knobs of :data:`PER_STEP_KNOBS`
    may be sequences of one value per step (e.g. a tuned grid's weights,
    :func:`spd_jax.diffusion.grids.load_tuned`).
    """
    method = check_method(method)
    check_process(process, method)
    num_steps = _check_num_steps(num_steps)
    method_knobs, grid_kw = resolve_knobs(method, DEFAULT_GRIDS[method] if grid is None else grid, knobs)
    linear = isinstance(process, DDMLinearProcess)
    if linear:
        if method_knobs["c_correction"] and "c_correction" in knobs:
            raise ValueError("ddm_linear's bridge step uses the raw c_hat: c_correction=True is not defined "
                             "for it (c = -x0 - a/2); leave c_correction unset or False")
        method_knobs["c_correction"] = False
        process = process.gaussian
    if method == "predict_project" and process.num_levels is not None:
        raise ValueError(
            f"predict_project needs the continuous SDE drift and diffusion (f, g^2) of the process; "
            f"{process.name!r} is discrete: use its continuous counterpart (e.g. vp_linear())"
        )
    grid = _build_grid(process, method, num_steps, grid, grid_kw)
    for name in PER_STEP_KNOBS.get(method, ()):
        value = method_knobs[name]
        if np.ndim(value) == 1 and len(value) != grid.size - 1:
            raise ValueError(f"{method} {name} has {len(value)} per-step values for {grid.size - 1} steps")
    alpha, sigma = process.marginal64(grid)
    shape = np.broadcast_shapes(alpha.shape, sigma.shape)
    alpha, sigma = np.broadcast_to(alpha, shape), np.broadcast_to(sigma, shape)
    with np.errstate(divide="ignore", invalid="ignore"):  # non-finite entries are reported below
        tables = _method_tables(process, method, grid, (alpha, sigma), method_knobs)
    for name, table in tables.items():
        bad = ~np.isfinite(np.asarray(table, np.float64))
        if bad.any():
            j = int(np.argwhere(bad)[0][0])
            raise ValueError(
                f"method {method!r} on process {process.name!r}: coefficient {name!r} is not finite at "
                f"step {j} (t = {grid[j]:.6g} -> {grid[j + 1]:.6g}); alpha_t = 0 there? "
                "start below t = 1 (t_max < 1)"
            )
    if linear:
        tables["a_a"] = _slope_table(grid, stochastic=bool(method_knobs["stochastic"]))
    tables.update(
        t_cur=network_times(grid[:-1], method_knobs.get("time_shift", 0.0), np),
        t_next=grid[1:],
        alpha_cur=alpha[:-1],
        sigma_cur=sigma[:-1],
        alpha_next=alpha[1:],
        sigma_next=sigma[1:],
    )
    steps = grid.size - 1
    nfe, aux = count_nfe(method, steps, final_zero=grid[-1] == 0.0, projection=_pp_projection(method_knobs))
    noisy = bool(np.any(tables.get("a_z", 0.0) != 0.0))
    return Plan(method, grid, tables, noisy, nfe, aux)


def count_nfe(method: str, steps: int, *, final_zero: bool = True, projection=None) -> tuple[int, int]:
    """(nfe, aux_nfe) of ``steps`` sampler steps (docs/math.md §6.8)."""
    method = check_method(method)
    if method == "heun":
        return (2 * steps - 1 if final_zero else 2 * steps), 0
    if method == "predict_project":
        if projection is _no_projection:
            return steps, 0
        return (2 * steps, 0) if projection is None else (steps, steps)
    if method == "smd":
        return steps, steps
    return steps, 0


def steps_for_nfe(method: str, target_nfe: int, *, grid=None) -> int:
    """Largest num_steps N whose nominal NFE(N) <= ``target_nfe`` (docs/math.md §0 "NFE targets").

    Nominal NFE: Heun 2N - 1 (2N on a grid not ending at t = 0), predict-project 2N (score plus
    surrogate or trained projection; kappa = 0 without a trained projection runs only N), the
    ``ddm_public`` grid N + 1, otherwise N.
    """
    method = check_method(method)
    name = DEFAULT_GRIDS[method] if grid is None else grid
    final_zero = name != "ge_discrete"

    def nominal(n: int) -> int:
        steps = grids.num_grid_steps(name, n)
        nfe, aux = count_nfe(method, steps, final_zero=final_zero)
        return nfe + aux if method == "predict_project" else nfe

    if nominal(1) > target_nfe:
        raise ValueError(f"method {method!r} needs at least {nominal(1)} NFE; target {target_nfe} is too small")
    n = 1
    while nominal(n + 1) <= target_nfe:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# the JAX scan
# ---------------------------------------------------------------------------------------------


class _JaxOps:
    """predict / noise / cond / projection of one scan step (see the update functions)."""

    def __init__(self, c, *, denoiser, projection, basis, key, index, shape, clip_x0, bridge, c_correction,
                 noisy, smd):
        self.c, self.denoiser, self.basis, self.key, self.index = c, denoiser, basis, key, index
        self.linear = "a_a" in c
        self.shape, self.clip_x0, self.bridge, self.c_correction = shape, clip_x0, bridge, c_correction
        self.noisy, self.smd = noisy, smd
        self.projection = None if projection is None else self._project_with(projection)

    def _time(self, level):
        return jnp.full((self.shape[0],), self.c["t_" + level], jnp.float32)

    def predict(self, u, level) -> Spectral:
        x = bases.from_spectral(u, self.basis)
        if self.smd:
            keys = example_keys(self.key, self.shape[0], self.index, step=LATENT_STEP_OFFSET + self.c["step"])
            pred = self.denoiser(x, self._time(level), key=keys)
        else:
            pred = self.denoiser(x, self._time(level))
        if not isinstance(pred, Prediction):
            raise TypeError(f"a denoiser must return spd_jax.diffusion.parameterization.Prediction; got {type(pred)}")
        slope = None
        if self.linear:
            if pred.a is None or pred.c is None:
                raise ValueError("process 'ddm_linear' needs a denoiser returning Prediction(x0, eps, c, a) "
                                 "(the 'ddm_linear' head)")
            slope = jnp.clip(pred.a, -1.0, 1.0)  # a ~ clip(N(0, 1), -1, 1): project onto its support
            t = self.c["t_" + level]
            pred = pred._replace(x0=pred.x0 - 0.5 * (slope - pred.a) * t * t)  # x0_hat of the clipped slope
        x0 = jnp.clip(pred.x0, -1.0, 1.0) if self.clip_x0 else pred.x0
        u0 = bases.to_spectral(x0, self.basis)
        if self.clip_x0 and not self.bridge:
            eps = (u - self.c["alpha_" + level] * u0) / self.c["sigma_" + level]
        else:
            eps = bases.to_spectral(pred.eps, self.basis)
        if self.c_correction or pred.c is None:
            neg_c = u0
        else:
            neg_c = -bases.to_spectral(pred.c, self.basis)
        return Spectral(u0, eps, neg_c, slope)

    def noise(self):
        if not self.noisy:
            return 0.0
        z = per_example_normal(self.key, self.shape, jnp.float32, index=self.index, step=self.c["step"])
        return bases.to_spectral(z, self.basis)

    @staticmethod
    def cond(flag, true_fn, false_fn):
        return jax.lax.cond(flag, true_fn, false_fn)

    def _project_with(self, projection):
        def project(u):
            x = bases.from_spectral(u, self.basis)
            return bases.to_spectral(projection(x, self._time("next")), self.basis)

        return project


_STATIC = ("denoiser", "projection", "method", "basis", "shape", "clip_x0", "c_correction", "noisy", "project",
           "unroll")


def _run(tables, process, key, x_init, index, variables, *, denoiser, projection, method, basis, shape, clip_x0,
         c_correction, noisy, project=None, unroll=1):
    """The sampler's scan (see :func:`sample`); ``unroll=True`` unrolls it, which makes reverse-mode
    differentiation through the steps several times faster on XLA:CPU (:func:`spd_jax.diffusion.tune.tune_to_teacher`)."""
    if variables is not None:  # traced: one compilation serves every parameter set
        denoiser = functools.partial(denoiser, variables)
    if x_init is None:
        x_init = process.prior_sample(key, shape, index=index)
    u = bases.to_spectral(x_init, basis)
    update = UPDATES[method]

    def step(state, c):
        ops = _JaxOps(
            c,
            denoiser=denoiser,
            projection=projection,
            basis=basis,
            key=key,
            index=index,
            shape=shape,
            clip_x0=clip_x0,
            bridge=method == "ddm_bridge",
            c_correction=c_correction,
            noisy=noisy,
            smd=method == "smd",
        )
        state = update(state, c, ops)
        if project is not None:  # e.g. known pixels re-imposed at the new level t_next (pixel space)
            x = project(bases.from_spectral(state[0], basis), c["t_next"], key, c["step"], index)
            state = (bases.to_spectral(x, basis), state[1])
        return state

    def body(state, c):
        if "active" in c:  # padded tables (device_tables(pad_to=...)): inactive rows leave the state as it is
            return jax.lax.cond(c["active"], step, lambda s, _: s, state, c), None
        return step(state, c), None

    (u, _), _ = jax.lax.scan(body, (u, initial_cache(tables, jnp.zeros_like(u))), tables, unroll=unroll)
    return bases.from_spectral(u, basis)


_run_jit = jax.jit(_run, static_argnames=_STATIC)


def run_tables(tables: dict, process: Process, x_T, *, denoiser, method: str, clip_x0: bool, variables=None,
               index=None, key=None, unroll=1):
    """The sampler scan on given tables, traceable and differentiable in them (no jit, no plan):
    ``tables`` as :func:`device_tables` gives them, e.g. computed from a traced grid
    (:func:`spd_jax.diffusion.tune.grid_tables`); ``x_T`` (B, H, W, C) the starting states. For
    deterministic samplers (no noise is drawn; ``key`` only keys SMD latents)."""
    x_T = jnp.asarray(x_T, jnp.float32)
    index = example_index(x_T.shape[0], index)
    key = jax.random.key(0) if key is None else key
    return _run(tables, process, key, x_T, index, variables, denoiser=denoiser, projection=None, method=method,
                basis="identity" if process.is_scalar else process.basis, shape=tuple(x_T.shape), clip_x0=clip_x0,
                c_correction=True, noisy=False, unroll=unroll)


def device_tables(plan_: Plan, pad_to: int | None = None) -> dict:
    """The scan's inputs: ``plan_``'s tables cast once to float32 (bool tables stay bool), one row
    per step, plus ``step`` (the step index, which keys the noise).

    ``pad_to`` (>= the plan's S steps) prepends ``pad_to - S`` inactive rows (copies of the first)
    and adds an ``active`` table: each inactive step leaves the state untouched (``lax.cond``, no
    network call), so every step count up to ``pad_to`` has tables of one structure and one
    compiled program serves them all; the real steps see the same inputs as unpadded."""
    steps = plan_.num_steps
    pad = 0 if pad_to is None else int(pad_to) - steps
    if pad_to is not None and (isinstance(pad_to, bool) or int(pad_to) != pad_to or pad < 0):
        raise ValueError(f"pad_to must be an integer >= the plan's {steps} steps; got {pad_to!r}")
    out = {}
    for name, table in plan_.tables.items():
        table = np.asarray(table)
        if pad:
            table = np.concatenate([np.repeat(table[:1], pad, axis=0), table])
        out[name] = jnp.asarray(table, jnp.bool_ if table.dtype == bool else jnp.float32)
    out["step"] = jnp.asarray(np.concatenate([np.zeros(pad), np.arange(steps)]), jnp.int32)
    if pad_to is not None:
        out["active"] = jnp.asarray(np.arange(pad + steps) >= pad)
    return out


def _resolve_shape(process: Process, shape, x_T):
    if x_T is not None:
        x_T = jnp.asarray(x_T, jnp.float32)
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was given")
        shape = x_T.shape
    if shape is None:
        raise ValueError("give the sample shape (B, H, W, C) as shape= or a starting state x_T")
    shape = tuple(int(s) for s in shape)
    process.check_image_shape(shape)
    return shape, x_T


def sample(
    denoiser: Callable[..., Prediction],
    process: Process,
    *,
    method: str,
    num_steps: int,
    key: jax.Array,
    clip_x0: bool,
    shape=None,
    x_T=None,
    grid=None,
    index=None,
    project=None,
    variables=None,
    pad_to=None,
    tables=None,
    **knobs,
) -> tuple[jax.Array, dict]:
    """Draw samples x (B, H, W, C), pixel space, with ``method`` over ``num_steps`` steps.

    Args:
      denoiser: ``denoiser(x_t, t, *, key=None) -> Prediction`` (pixel space, t of shape (B,)),
        or ``denoiser(variables, x_t, t, *, key=None)`` when ``variables`` is given. Hashable (a
        function): compiled samplers are cached per denoiser object, so pass a network's
        parameters as ``variables`` rather than closing over them.
      variables: a pytree handed to the denoiser as a traced argument (e.g. Flax variables):
        sampling with another parameter set of the same structure reuses the compiled sampler.
      process: a Gaussian-prior :class:`~spd_jax.diffusion.processes.Process`, or
        :class:`~spd_jax.diffusion.processes.DDMLinearProcess` with ``method="ddm_bridge"``.
      method: one of :data:`METHODS`; ``knobs`` are its options (:data:`KNOBS`) and grid options.
      num_steps: sampler steps N (>= 1); the NFE is in ``info["nfe"]`` (see :func:`steps_for_nfe`).
      key: PRNG key; noise of example i at step j is normal(fold_in(fold_in(key, i), j)).
      clip_x0: clip x0_hat to [-1, 1] in pixel space (no default: off for analytic denoisers,
        latent models and exactness tests; on for learned pixel-space models).
      shape, x_T: sample shape, or the starting state at the first grid level (default: a draw
        from ``process.prior_sample``).
      grid: a grid name (:data:`spd_jax.diffusion.grids.GRIDS`) or an explicit array of t levels.
      index: global example indices (B,) of this batch (default arange(B)).
      project: optional ``project(x, t_next, key, step, index) -> x`` applied in pixel space after
        every step (t_next the level reached; 0 after the last step), e.g. a known-pixel projection.
      pad_to: run a scan of this many steps whose first ``pad_to - num_steps`` do nothing (see
        :func:`device_tables`): samplers of one method and knobs at any step count up to ``pad_to``
        then share one compiled program. The samples are those of the unpadded run.
      tables: the run's :func:`device_tables`, computed by the caller (e.g. passed into an outer
        ``jax.jit`` as an argument, so that one compilation serves every grid and step count);
        they must come from the same method, knobs and process.

    Returns:
      (x, info) with info = {"nfe", "aux_nfe", "grid" (float64 t levels), "method"}.
    """
    if not isinstance(clip_x0, bool):
        raise ValueError(f"clip_x0 must be True or False; got {clip_x0!r}")
    method = check_method(method)
    check_process(process, method)
    plan_ = plan(process, method=method, num_steps=num_steps, grid=grid, **knobs)
    linear = isinstance(process, DDMLinearProcess)
    if linear:  # its Gaussian part (alpha, sigma, prior) is ddm_constant's; the slope enters via the tables
        process = process.gaussian
    shape, x_T = _resolve_shape(process, shape, x_T)
    index = example_index(shape[0], index)
    projection = _pp_projection(knobs) if method == "predict_project" else None
    try:
        hash(denoiser)
        hash(projection)
        hash(project)
    except TypeError as err:
        raise ValueError("denoiser, projection and project must be hashable callables (functions or partials)") from err
    if project is not None and not callable(project):
        raise ValueError("project must be a function project(x, t_next, key, step, index) -> x")
    if tables is None:
        tables = device_tables(plan_, pad_to)
    elif pad_to is not None:
        raise ValueError("give pad_to or precomputed tables, not both")
    x = _run_jit(
        tables,
        process,
        key,
        x_T,
        index,
        variables,
        denoiser=denoiser,
        projection=projection,
        method=method,
        basis="identity" if process.is_scalar else process.basis,
        shape=shape,
        clip_x0=clip_x0,
        c_correction=False if linear else bool(knobs.get("c_correction", True)),
        noisy=plan_.noisy,
        project=project,
    )
    info = {"nfe": plan_.nfe, "aux_nfe": plan_.aux_nfe, "grid": plan_.grid, "method": method}
    return x, info
