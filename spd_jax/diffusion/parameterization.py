"""Per-frequency conversions between network targets (docs/math.md §4) and the denoiser contract.

Per-frequency functions act on spectral coefficients u (or on pixels for frequency-independent
processes) with (alpha, sigma) from :meth:`Process.marginal`; u_t = alpha u_0 + sigma eps.

The denoiser contract (docs/math.md §0): ``denoiser(x_t, t, *, key=None) -> Prediction(x0, eps)`` in pixel
space, x_t of shape (B, H, W, C), t of shape (B,), both fields unclipped. DDM dual heads may also
fill ``c`` (the c-head's estimate of c = -x_0), which ``ddm_bridge`` uses.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from spd_jax.diffusion import bases

TARGETS = ("eps", "x0", "v", "flow", "score")


class Prediction(NamedTuple):
    """A denoiser's output in pixel space: x0 and eps estimates, optionally DDM's c, and the
    slope a of DDM's linear attenuation (``ddm_linear``, where x0 = x_t - H_t(a, c) - sqrt(t) eps)."""

    x0: jax.Array
    eps: jax.Array
    c: jax.Array | None = None
    a: jax.Array | None = None


Denoiser = Callable[..., Prediction]


# ---- per-frequency formulas -----------------------------------------------------------------


def x0_from_eps(u_t, eps, alpha, sigma):
    return (u_t - sigma * eps) / alpha


def eps_from_x0(u_t, x0, alpha, sigma):
    return (u_t - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    """Generalised v = (alpha eps - sigma u_0) / sqrt(alpha^2 + sigma^2) (Salimans-Ho v for VP)."""
    return (alpha * eps - sigma * x0) / jnp.sqrt(alpha**2 + sigma**2)


def x0_eps_from_v(u_t, v, alpha, sigma):
    r = jnp.sqrt(alpha**2 + sigma**2)
    a_hat, s_hat = alpha / r, sigma / r
    return a_hat * u_t / r - s_hat * v, s_hat * u_t / r + a_hat * v


def flow_from_x0_eps(x0, eps, dalpha, dsigma):
    """Flow-matching velocity d u_t / dt = alpha' u_0 + sigma' eps (rectified flow: eps - u_0)."""
    return dalpha * x0 + dsigma * eps


def x0_eps_from_flow(u_t, flow, alpha, sigma, dalpha, dsigma):
    det = alpha * dsigma - sigma * dalpha
    return (dsigma * u_t - sigma * flow) / det, (alpha * flow - dalpha * u_t) / det


def score_from_eps(eps, sigma):
    return -eps / sigma


def x0_eps_from_score(u_t, score, alpha, sigma):
    """Tweedie: u_0 = (u_t + sigma^2 score)/alpha, eps = -sigma score."""
    return (u_t + sigma**2 * score) / alpha, -sigma * score


def ddm_x0(x_t, c, eps, alpha, sigma):
    """DDM dual head: x_0 = x_t - (1 - alpha) c - sigma eps (official: x_t - c t - sqrt(t) eps)."""
    return x_t - (1.0 - alpha) * c - sigma * eps


def ddm_linear_x0(x_t, a, c, eps, t):
    """DDM linear attenuation: x_0 = x_t - H_t - sqrt(t) eps with H_t = a t^2/2 + c t (docs/math.md §2.6b);
    ``t`` broadcastable to x_t."""
    return x_t - (0.5 * a * t + c) * t - jnp.sqrt(t) * eps


def ddm_eps_from_c(x_t, c, alpha, sigma):
    """DDM single-head variant: eps = (x_t + alpha c)/sigma, with c = -x_0."""
    return (x_t + alpha * c) / sigma


# ---- pixel-space adapters ---------------------------------------------------------------------


def basis_of(process) -> str:
    return "identity" if process.is_scalar else process.basis


def marginal_derivative(process, t):
    """(alpha', sigma') = d/dt of the marginal coefficients at t (JAX forward-mode)."""
    if process.num_levels is not None:
        raise ValueError(f"process {process.name!r} is discrete: its schedule has no time derivative")
    t = jnp.asarray(t, jnp.float32)
    _, (dalpha, dsigma) = jax.jvp(process.marginal, (t,), (jnp.ones_like(t),))
    return dalpha, dsigma


def target_from_x0_eps(process, x0, eps, t, target: str):
    """Training target in pixel space for clean x0 and pixel noise eps at times t (B,)."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    alpha, sigma = process.marginal(t)
    basis = basis_of(process)
    u0, ue = bases.to_spectral(x0, basis), bases.to_spectral(eps, basis)
    if target == "v":
        return bases.from_spectral(v_from_x0_eps(u0, ue, alpha, sigma), basis)
    if target == "flow":
        dalpha, dsigma = marginal_derivative(process, t)
        return bases.from_spectral(flow_from_x0_eps(u0, ue, dalpha, dsigma), basis)
    if target == "score":
        return bases.from_spectral(score_from_eps(ue, sigma), basis)
    raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")


def prediction_from_output(process, x_t, t, output, target: str) -> Prediction:
    """Convert a network output (pixel space) for ``target`` into Prediction(x0, eps)."""
    alpha, sigma = process.marginal(t)
    basis = basis_of(process)
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")
    u_t, u_out = bases.to_spectral(x_t, basis), bases.to_spectral(output, basis)
    if target == "eps":
        u0, ue = x0_from_eps(u_t, u_out, alpha, sigma), u_out
    elif target == "x0":
        u0, ue = u_out, eps_from_x0(u_t, u_out, alpha, sigma)
    elif target == "v":
        u0, ue = x0_eps_from_v(u_t, u_out, alpha, sigma)
    elif target == "flow":
        dalpha, dsigma = marginal_derivative(process, t)
        u0, ue = x0_eps_from_flow(u_t, u_out, alpha, sigma, dalpha, dsigma)
    else:
        u0, ue = x0_eps_from_score(u_t, u_out, alpha, sigma)
    return Prediction(x0=bases.from_spectral(u0, basis), eps=bases.from_spectral(ue, basis))


def ddm_prediction(process, x_t, t, c, eps) -> Prediction:
    """Prediction from DDM dual heads (c, eps) for a frequency-independent process."""
    if not process.is_scalar:
        raise ValueError(f"the DDM dual head needs a frequency-independent process; got {process.name!r}")
    alpha, sigma = process.marginal(t)
    return Prediction(x0=ddm_x0(x_t, c, eps, alpha, sigma), eps=eps, c=c)


def make_denoiser(apply_fn: Callable, process, target: str) -> Denoiser:
    """Wrap ``apply_fn(x_t, t) -> output`` (pixel space) as a denoiser for any sampler."""
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")

    def denoiser(x_t, t, *, key=None):
        del key
        return prediction_from_output(process, x_t, t, apply_fn(x_t, t), target)

    return denoiser
