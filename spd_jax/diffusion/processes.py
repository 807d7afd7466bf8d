"""Gaussian corruption processes diagonal in an orthonormal spectral basis (docs/math.md §1–2).

Every process is u_t(k) = alpha_t(k) u_0(k) + sigma_t(k) eps(k) with u = B x (docs/math.md eq. 1.1,
t in [0, 1], t = 0 data, t = 1 noise. A :class:`Process` is a pytree (jit, vmap and scan friendly):
its arrays are leaves and its kind, basis and scalar constants are static.

Two evaluation paths share one set of formulas:

* :meth:`Process.marginal` — JAX, float32, for use inside jitted code (training, samplers);
* :meth:`Process.marginal64` — NumPy float64, for building grids, validation and Fisher lengths.

Constructors: :func:`vp_linear`, :func:`vp_cosine`, :func:`blurring`, :func:`ihdm`, :func:`spd`,
:func:`ddm_constant`, :func:`rectified_flow`; :func:`ddm_linear` builds the separate
:class:`DDMLinearProcess` (not of form 1.1). :func:`make` builds any of them by name.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spd_jax.diffusion import bases
from spd_jax.diffusion.rng import per_example_normal

_SMALL_LOG = 1e-6  # |log S| below which SPD uses its S -> 1 limit


def _spd_abar_sigma2(xp, e, one_minus_e, log_s):
    """abar = expm1(e L)/expm1(L), sigma^2 = expm1(-(1-e) L)/expm1(-L), with the L -> 0 limit.

    ``one_minus_e`` is passed separately so that sigma^2 keeps full relative accuracy near t = 0
    (1 - e computed in float32 from e ~ 1 would lose it, docs/math.md §10).
    """
    small = xp.abs(log_s) < _SMALL_LOG
    safe = xp.where(small, 1.0, log_s)
    abar = xp.where(small, e, xp.expm1(e * safe) / xp.expm1(safe))
    sigma2 = xp.where(small, one_minus_e, xp.expm1(-one_minus_e * safe) / xp.expm1(-safe))
    return abar, sigma2


def schedule(kind: str, xp, t, params: dict, cfg: dict):
    """(alpha, sigma) of schedule ``kind`` at time array ``t`` (already shaped to broadcast), with
    ``xp`` = numpy (float64 tables) or jax.numpy (traced, e.g. under jax.grad)."""
    if kind == "vp_linear":
        b0, b1 = cfg["beta_min"], cfg["beta_max"]
        integral = b0 * t + 0.5 * (b1 - b0) * t * t
        return xp.exp(-0.5 * integral), xp.sqrt(-xp.expm1(-integral))
    if kind == "vp_discrete":
        levels = params["log_abar"].shape[0] - 1
        j = xp.clip(xp.round(t * levels), 0, levels).astype(np.int32)
        log_abar = xp.asarray(params["log_abar"])[j]
        return xp.exp(0.5 * log_abar), xp.sqrt(-xp.expm1(log_abar))
    if kind == "vp_cosine":
        s = cfg["offset"]
        a = (t + s) / (1.0 + s) * (np.pi / 2)
        a0 = s / (1.0 + s) * (np.pi / 2)
        alpha = xp.cos(a) / np.cos(a0)
        # 1 - cos^2(a)/cos^2(a0) = sin(a - a0) sin(a + a0)/cos^2(a0), with a - a0 formed from t
        sigma2 = xp.sin(t / (1.0 + s) * (np.pi / 2)) * xp.sin(a + a0) / np.cos(a0) ** 2
        return xp.maximum(alpha, 0.0), xp.sqrt(xp.clip(sigma2, 0.0, 1.0))
    if kind == "blurring":
        l_min, l_max = cfg["logsnr_min"], cfg["logsnr_max"]
        c_max = np.arctan(np.exp(-l_max / 2))
        c_min = np.arctan(np.exp(-l_min / 2)) - c_max
        logsnr = -2.0 * xp.log(xp.tan(c_min * t + c_max))
        a = xp.sqrt(1.0 / (1.0 + xp.exp(-logsnr)))
        s = xp.sqrt(1.0 / (1.0 + xp.exp(logsnr)))
        sigma_blur = cfg["blur_sigma_max"] * xp.sin(np.pi * t / 2) ** 2
        d_min = cfg["d_min"]
        d = (1.0 - d_min) * xp.exp(-params["heat"] * sigma_blur**2 / 2) + d_min
        return a * d, s * xp.ones_like(d)
    if kind == "ihdm":
        levels = params["blur_sigma"].shape[0] - 1
        j = xp.clip(xp.round(t * levels), 0, levels).astype(np.int32)
        sigma_blur = xp.asarray(params["blur_sigma"])[j]
        alpha = xp.exp(-params["heat"] * sigma_blur**2 / 2)
        return alpha, cfg["noise"] * xp.ones_like(alpha)
    if kind == "spd":
        one_minus_e = t - cfg["deviation"] * 4.0 * t * (1.0 - t) * params["direction"]
        abar, sigma2 = _spd_abar_sigma2(xp, 1.0 - one_minus_e, one_minus_e, params["log_spectrum"])
        if xp is np:  # float64 path: leave invalid (negative) values visible to validate()
            return np.sqrt(abar), np.sqrt(sigma2)
        return xp.sqrt(xp.clip(abar, 0.0, None)), xp.sqrt(xp.clip(sigma2, 0.0, None))
    if kind == "ddm_constant":
        return 1.0 - t, xp.sqrt(t)
    if kind == "rectified_flow":
        return 1.0 - t, t
    raise ValueError(f"unknown process kind {kind!r}")


def _t_shape(t, scalar_process: bool, xp):
    """Reshape t so that (alpha, sigma) broadcast against (B, H, W, C) or (H, W, C)."""
    t = xp.asarray(t)
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or have shape (B,); got shape {t.shape}")
    if scalar_process:
        return t.reshape(t.shape + (1, 1, 1)) if t.ndim == 1 else t
    return t.reshape(t.shape + (1, 1, 1))


@struct.dataclass
class Process:
    """A Gaussian corruption diagonal in ``basis`` (see module docstring).

    Attributes:
      kind: formula family (static).
      basis: "dft", "dct" or "identity" (static).
      grid_shape: (H, W, C) of the spectral schedule, or None for frequency-independent processes.
      params: float64 NumPy arrays the formulas read (spectrum, heat eigenvalues, tables).
      config: scalar constants of the formula, as a sorted tuple of (name, value) pairs (static).
      name: display name (static).
    """

    params: dict
    kind: str = struct.field(pytree_node=False)
    basis: str = struct.field(pytree_node=False)
    grid_shape: tuple | None = struct.field(pytree_node=False)
    config: tuple = struct.field(pytree_node=False, default=())
    name: str = struct.field(pytree_node=False, default="")

    # ---- static facts -------------------------------------------------------------------------
    @property
    def is_scalar(self) -> bool:
        """True when alpha, sigma do not depend on frequency (the basis is then irrelevant)."""
        return self.grid_shape is None

    @property
    def gaussian_prior(self) -> bool:
        """False for IHDM, whose terminal law is blurred data (docs/math.md §2.4)."""
        return self.kind != "ihdm"

    @property
    def num_levels(self) -> int | None:
        """Number of noisy levels of a discrete process (t snapped to j / num_levels), else None."""
        if self.kind == "vp_discrete":
            return self.params["log_abar"].shape[0] - 1
        if self.kind == "ihdm":
            return self.params["blur_sigma"].shape[0] - 1
        return None

    @property
    def cfg(self) -> dict:
        return dict(self.config)

    # ---- schedule -----------------------------------------------------------------------------
    def marginal(self, t):
        """(alpha_t, sigma_t) in float32 JAX arrays.

        t: scalar or shape (B,). Scalar processes return scalars (or (B, 1, 1, 1)); spectral
        processes return (H, W, C) (or (B, H, W, C)) arrays on the basis's frequency grid.
        """
        t = _t_shape(jnp.asarray(t, jnp.float32), self.is_scalar, jnp)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.params)
        alpha, sigma = schedule(self.kind, jnp, t, params, self.cfg)
        return alpha.astype(jnp.float32), sigma.astype(jnp.float32)

    def marginal64(self, t):
        """(alpha_t, sigma_t) in float64 NumPy (for grids, validation and Fisher lengths)."""
        t = _t_shape(np.asarray(t, np.float64), self.is_scalar, np)
        params = {k: np.asarray(v, np.float64) for k, v in self.params.items()}
        with np.errstate(invalid="ignore"):  # invalid processes give NaN, caught by validate()
            alpha, sigma = schedule(self.kind, np, t, params, self.cfg)
        return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)

    def snr(self, t):
        alpha, sigma = self.marginal(t)
        return alpha**2 / sigma**2

    def transition(self, t, s):
        """q(u_t | u_s) for s < t: (alpha_{t|s}, sigma_{t|s}) per frequency (docs/math.md eq. 1.2."""
        alpha_t, sigma_t = self.marginal(t)
        alpha_s, sigma_s = self.marginal(s)
        alpha_ts = alpha_t / alpha_s
        var = jnp.maximum(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
        return alpha_ts, jnp.sqrt(var)

    def posterior(self, t, s):
        """q(u_s | u_t, u_0) for s < t: (coef on u_t, coef on u_0, std) per frequency (eq. 1.3)."""
        alpha_t, sigma_t = self.marginal(t)
        alpha_s, sigma_s = self.marginal(s)
        alpha_ts = alpha_t / alpha_s
        var_ts = jnp.maximum(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
        coef_ut = alpha_ts * sigma_s**2 / sigma_t**2
        coef_u0 = alpha_s * var_ts / sigma_t**2
        std = jnp.sqrt(var_ts * sigma_s**2 / sigma_t**2)
        return coef_ut, coef_u0, std

    # ---- pixel-space sampling ----------------------------------------------------------------
    def apply(self, x, gain):
        """Pixel-space image of the diagonal operator ``gain`` in this process's basis."""
        return bases.apply_diagonal(x, gain, "identity" if self.is_scalar else self.basis)

    def forward_sample(self, x0, t, key, index=None):
        """Draw x_t ~ q(x_t | x_0) in pixel space. Returns (x_t, eps) with eps the pixel noise.

        x0: (B, H, W, C); t: (B,); the noise of example i is normal(fold_in(key, index[i])).
        """
        self.check_image_shape(x0.shape)
        t = jnp.asarray(t)
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},) to match x0; got {t.shape}")
        eps = per_example_normal(key, x0.shape, x0.dtype, index=index)
        alpha, sigma = self.marginal(t)
        if self.is_scalar:
            return alpha * x0 + sigma * eps, eps
        basis = self.basis
        u = alpha * bases.to_spectral(x0, basis) + sigma * bases.to_spectral(eps, basis)
        return bases.from_spectral(u, basis), eps

    def prior_sample(self, key, shape, index=None, data=None):
        """Draw from the sampler prior at t = 1: N_B(0, sigma_1^2) in pixels (docs/math.md §0).

        IHDM's prior is data-dependent: pass ``data`` (N, H, W, C); example i blurs
        data[i mod N] to the last level and adds the process noise.
        """
        self.check_image_shape(shape)
        z = per_example_normal(key, shape, jnp.float32, index=index)
        alpha, sigma = self.marginal(jnp.float32(1.0))
        if not self.gaussian_prior:
            if data is None:
                raise ValueError(
                    f"process {self.name!r} has a data-dependent prior (blurred training images); "
                    "call prior_sample(key, shape, data=images)"
                )
            data = jnp.asarray(data, jnp.float32)
            picks = data[jnp.arange(shape[0]) % data.shape[0]]
            return self.apply(picks, alpha) + self.apply(z, sigma)
        return self.apply(z, sigma)

    def check_image_shape(self, shape) -> None:
        """Raise if ``shape`` (B, H, W, C) does not fit this process's spectral grid."""
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(f"images must have shape (B, H, W, C); got {shape}")
        if self.grid_shape is None:
            return
        h, w, c = self.grid_shape
        if shape[1:3] != (h, w) or c not in (1, shape[3]):
            raise ValueError(
                f"image shape {shape} does not match the process {self.name!r} spectral grid "
                f"(H, W, C) = {self.grid_shape}"
            )


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

_V1_EXEMPT = ("blurring", "ihdm", "vp_discrete")


def _validation_times(levels: int | None) -> np.ndarray:
    if levels is not None:
        return np.arange(levels + 1, dtype=np.float64) / levels
    j = np.arange(4097, dtype=np.float64)
    return np.sin(np.pi * j / (2 * 4096)) ** 2  # dense at both ends


def _frequency_name(proc: Process, flat_index: int, full_shape) -> str:
    idx = np.unravel_index(flat_index, full_shape)
    if proc.is_scalar:
        return "all frequencies"
    return f"frequency (ky, kx, channel) = {tuple(int(i) for i in idx)}"


def validate(proc: Process) -> Process:
    """Check docs/math.md §1.3 V1–V3 in float64; raise ValueError naming the frequency and time."""
    name = proc.name or proc.kind
    times = _validation_times(proc.num_levels)
    alpha, sigma = proc.marginal64(times)
    alpha = np.broadcast_to(alpha, np.broadcast_shapes(alpha.shape, sigma.shape))
    sigma = np.broadcast_to(sigma, alpha.shape)
    alpha = alpha.reshape(len(times), -1)
    sigma = sigma.reshape(len(times), -1)
    grid = proc.grid_shape or (1,)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(alpha) & np.isfinite(sigma)) | (alpha < 0) | (sigma < 0)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(
            f"process {name}: alpha/sigma not finite and non-negative (a negative variance: the SNR "
            f"increases) at t={times[i]:.6g}, {_frequency_name(proc, k, grid)} "
            f"(alpha={alpha[i, k]}, sigma={sigma[i, k]})"
        )
    # V1: t = 0 is clean data.
    if proc.kind not in _V1_EXEMPT:
        err = np.max(np.abs(alpha[0] - 1.0) + sigma[0])
        if err > 1e-6:
            k = int(np.argmax(np.abs(alpha[0] - 1.0) + sigma[0]))
            raise ValueError(
                f"process {name}: t=0 is not clean data at {_frequency_name(proc, k, grid)}: "
                f"alpha_0={alpha[0, k]:.6g} (expected 1), sigma_0={sigma[0, k]:.6g} (expected 0)"
            )
    # V2: SNR non-increasing <=> sigma_{t|s}^2 >= 0 between consecutive grid times.
    ratio = np.divide(alpha[1:], alpha[:-1], out=np.zeros_like(alpha[1:]), where=alpha[:-1] > 0)
    var_ts = sigma[1:] ** 2 - ratio**2 * sigma[:-1] ** 2
    tol = 1e-10 * np.maximum(sigma[1:] ** 2, 1e-300)
    viol = var_ts < -tol
    if viol.any():
        i, k = np.argwhere(viol)[0]
        raise ValueError(
            f"process {name}: SNR increases between t={times[i]:.6g} and t={times[i + 1]:.6g} at "
            f"{_frequency_name(proc, k, grid)} (sigma_(t|s)^2 = {var_ts[i, k]:.3g} < 0); "
            "the process must corrupt monotonically"
        )
    # SNR must fall overall (strictly decreasing somewhere) at every frequency ...
    snr0 = alpha[0] ** 2 / np.maximum(sigma[0] ** 2, 1e-300)
    snr1 = alpha[-1] ** 2 / np.maximum(sigma[-1] ** 2, 1e-300)
    flat = ~(snr1 < snr0)
    if proc.kind == "ihdm":
        flat[0] = False  # DC is never noised in IHDM (documented exemption)
    if flat.any():
        k = int(np.argmax(flat))
        raise ValueError(
            f"process {name}: SNR does not decrease from t=0 to t=1 at {_frequency_name(proc, k, grid)}"
        )
    # V3: Gaussian-terminal processes end at ~N(0, I).
    if proc.gaussian_prior:
        a1, s1 = np.max(alpha[-1]), np.max(np.abs(sigma[-1] - 1.0))
        if a1 > 0.01 or s1 > 0.01:
            raise ValueError(
                f"process {name}: t=1 is not N(0, I): max alpha_1 = {a1:.3g} (expected <= 0.01), "
                f"max |sigma_1 - 1| = {s1:.3g} (expected <= 0.01)"
            )
    return proc


# ---------------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------------


def _config(**kw) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in kw.items()))


def _check_grid_shape(shape, what: str) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what}: shape must be (H, W, C) with positive sizes; got {shape}")
    return shape


def vp_linear(num_steps: int | None = None, beta_min: float = 0.1, beta_max: float = 20.0) -> Process:
    """DDPM linear schedule (docs/math.md §2.1).

    ``num_steps=None``: continuous score-SDE VP with beta(t) = beta_min + (beta_max - beta_min) t.
    ``num_steps=T``: the discrete DDPM table, betas linspace(1e-4, 0.02) scaled by 1000/T, level i
    at t = (i + 1)/T (``marginal`` snaps t to the nearest level, t = 0 being data).
    """
    if num_steps is None:
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"vp_linear needs 0 <= beta_min < beta_max; got {beta_min}, {beta_max}")
        return validate(
            Process(
                params={},
                kind="vp_linear",
                basis="identity",
                grid_shape=None,
                config=_config(beta_min=beta_min, beta_max=beta_max),
                name="vp_linear",
            )
        )
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"vp_linear num_steps must be an integer >= 2; got {num_steps}")
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, int(num_steps), dtype=np.float64)
    if betas[-1] >= 1:
        raise ValueError(f"vp_linear num_steps={num_steps} gives beta >= 1; use num_steps >= 21")
    log_abar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
    return validate(
        Process(
            params={"log_abar": log_abar},
            kind="vp_discrete",
            basis="identity",
            grid_shape=None,
            name=f"vp_linear_T{int(num_steps)}",
        )
    )


def vp_cosine(offset: float = 0.008) -> Process:
    """IDDPM cosine schedule, continuous: abar(t) = f(t)/f(0), f = cos^2((t+s)/(1+s) pi/2).

    alpha_1 = 0 exactly: samplers start at t_max < 1 (docs/math.md §1.3 V5).
    """
    if not offset > 0:
        raise ValueError(f"vp_cosine offset must be > 0; got {offset}")
    return validate(
        Process(
            params={},
            kind="vp_cosine",
            basis="identity",
            grid_shape=None,
            config=_config(offset=offset),
            name="vp_cosine",
        )
    )


def blurring(
    shape,
    blur_sigma_max: float = 20.0,
    d_min: float = 0.001,
    logsnr_min: float = -10.0,
    logsnr_max: float = 10.0,
) -> Process:
    """Blurring diffusion (Hoogeboom & Salimans), DCT basis, docs/math.md §2.3.

    alpha_t(k) = a_t d_t(k), sigma_t = s_t with a_t^2 = sigmoid(l_t), s_t^2 = sigmoid(-l_t) and
    d_t(k) = (1 - d_min) exp(-lambda_k sigma_B(t)^2 / 2) + d_min, sigma_B(t) = max sin^2(pi t/2).
    V1 exemption: sigma_0 = sqrt(sigmoid(-logsnr_max)) = 0.0067 by default.
    """
    h, w, c = _check_grid_shape(shape, "blurring")
    if not blur_sigma_max > 0 or not 0 < d_min < 1:
        raise ValueError(f"blurring needs blur_sigma_max > 0 and 0 < d_min < 1; got {blur_sigma_max}, {d_min}")
    heat = bases.heat_eigenvalues(h, w)[:, :, None]
    return validate(
        Process(
            params={"heat": heat},
            kind="blurring",
            basis="dct",
            grid_shape=(h, w, 1),
            config=_config(
                blur_sigma_max=blur_sigma_max, d_min=d_min, logsnr_min=logsnr_min, logsnr_max=logsnr_max
            ),
            name="blurring",
        )
    )


def ihdm(
    shape, num_levels: int = 200, blur_sigma_min: float = 0.5, blur_sigma_max: float = 24.0, noise: float = 0.01
) -> Process:
    """Inverse heat dissipation (Rissanen et al.), DCT basis, discrete levels j/K (docs/math.md §2.4).

    alpha_j(k) = exp(-lambda_k sigma_B,j^2 / 2), sigma_B log-spaced from ``blur_sigma_min`` to
    ``blur_sigma_max`` (sigma_B,0 = 0), sigma = ``noise`` everywhere. **Its prior is not Gaussian**:
    DC is never noised and the terminal state is the training data blurred to level K, so
    ``prior_sample`` needs data and the generic Gaussian-prior samplers refuse this process.
    """
    h, w, c = _check_grid_shape(shape, "ihdm")
    if num_levels < 1 or not 0 < blur_sigma_min < blur_sigma_max or not noise > 0:
        raise ValueError(
            f"ihdm needs num_levels >= 1, 0 < blur_sigma_min < blur_sigma_max, noise > 0; got "
            f"{num_levels}, {blur_sigma_min}, {blur_sigma_max}, {noise}"
        )
    blur_sigma = np.concatenate([[0.0], np.geomspace(blur_sigma_min, blur_sigma_max, int(num_levels))])
    return validate(
        Process(
            params={"heat": bases.heat_eigenvalues(h, w)[:, :, None], "blur_sigma": blur_sigma},
            kind="ihdm",
            basis="dct",
            grid_shape=(h, w, 1),
            config=_config(noise=noise),
            name="ihdm",
        )
    )


def check_spectrum(spectrum, basis: str = "dft") -> np.ndarray:
    """Validate a power spectrum (H, W, C): finite, > 0 and, for the DFT, even in k (docs/math.md §1.3 V4)."""
    s = np.asarray(spectrum, dtype=np.float64)
    if s.ndim != 3 or min(s.shape) < 1:
        raise ValueError(f"spectrum must have shape (H, W, C); got {s.shape}")
    bad = ~np.isfinite(s) | (s <= 0)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"spectrum must be finite and > 0 at every frequency; at (ky, kx, channel) = {idx} it "
            f"is {s[idx]!r} (floor estimated spectra at a small positive value, e.g. 1e-8)"
        )
    if basis == "dft":
        mirrored = bases.mirror(s)
        asym = np.abs(mirrored - s) > 1e-6 * np.abs(s)
        if asym.any():
            idx = tuple(int(i) for i in np.argwhere(asym)[0])
            raise ValueError(
                f"a DFT spectrum must be even in k (S(k) = S(-k)) so that outputs are real; at "
                f"(ky, kx, channel) = {idx} S = {s[idx]:.6g} but S(-k) = {mirrored[idx]:.6g}"
            )
    return s


def spd(spectrum, basis: str = "dft", deviation: float = 0.0, direction=None) -> Process:
    """Shortest path diffusion (docs/math.md §2.5): the Fisher geodesic from N_B(0, S) to N(0, I).

    abar_t(k) = expm1((1-t) L_k)/expm1(L_k), sigma_t(k)^2 = expm1(-t L_k)/expm1(-L_k), L = log S,
    so that alpha^2 S + sigma^2 = S^(1-t). ``spectrum`` is an (H, W, C) array on the basis's grid
    (see :mod:`spd_jax.diffusion.spectrum`).

    ``deviation`` (epsilon) and ``direction`` (h(k), an array broadcastable to the grid, default
    +1 below the median |k| and -1 above) give the docs/math.md §3.5 deviation family: the exponent
    1 - t becomes 1 - t + epsilon 4 t (1 - t) h(k); epsilon = 0 is SPD itself.
    """
    s = check_spectrum(spectrum, basis)
    log_s = np.log(s)
    if direction is None:
        direction = default_deviation_direction(s.shape, basis)
    direction = np.broadcast_to(np.asarray(direction, np.float64), s.shape).copy()
    # the exponent e_k(t) = 1 - t + eps 4 t (1 - t) h(k) must fall strictly from 1 to 0:
    # de/dt = -1 + 4 eps (1 - 2t) h(k) < 0 on [0, 1]  <=>  |eps h(k)| < 1/4 where log S != 0.
    slope = np.abs(deviation * direction) * (np.abs(log_s) >= _SMALL_LOG)
    if (slope >= 0.25).any():
        idx = tuple(int(i) for i in np.argwhere(slope >= 0.25)[0])
        t_bad = 0.0 if deviation * direction[idx] > 0 else 1.0
        raise ValueError(
            f"spd deviation={deviation} with h={direction[idx]:g} at frequency (ky, kx, channel) = "
            f"{idx}: the SNR stops decreasing near t={t_bad:g} (needs |deviation * h(k)| < 1/4)"
        )
    name = "spd" if deviation == 0 else f"spd_dev{deviation:g}"
    return validate(
        Process(
            params={"log_spectrum": log_s, "direction": direction},
            kind="spd",
            basis=bases.check_basis(basis),
            grid_shape=s.shape,
            config=_config(deviation=deviation),
            name=name,
        )
    )


def default_deviation_direction(shape, basis: str = "dft") -> np.ndarray:
    """h(k) = +1 for |k| <= median |k|, -1 otherwise (docs/math.md §3.5), shaped (H, W, C)."""
    mag = bases.frequency_magnitude(shape[0], shape[1], basis)
    h = np.where(mag <= np.median(mag), 1.0, -1.0)
    return np.broadcast_to(h[:, :, None], tuple(shape)).copy()


def ddm_constant() -> Process:
    """DDM/ADM constant attenuation: x_t = x_0 - t x_0 + sqrt(t) eps, i.e. alpha = 1-t, sigma = sqrt(t)."""
    return validate(Process(params={}, kind="ddm_constant", basis="identity", grid_shape=None, name="ddm_constant"))


def rectified_flow() -> Process:
    """Rectified flow / ADM "const2": alpha = 1 - t, sigma = t."""
    return validate(
        Process(params={}, kind="rectified_flow", basis="identity", grid_shape=None, name="rectified_flow")
    )


@struct.dataclass
class DDMLinearProcess:
    """DDM linear attenuation (docs/math.md §2.6b): x_t = (1-t) x_0 + (a/2)(t^2 - t) + sqrt(t) eps.

    a = clip(N(0, 1), -1, 1) per element, independent of x_0: the offset makes the marginal
    non-Gaussian, so this is *not* a :class:`Process`; it has its own (a, C) head and bridge step
    and is excluded from Fisher tables and the generic sampler matrix.
    """

    name: str = struct.field(pytree_node=False, default="ddm_linear")
    is_scalar = True  # frequency-independent: every pixel has the same (alpha, sigma)

    @property
    def gaussian(self) -> Process:
        """The Gaussian part x_t = (1-t) x_0 + sqrt(t) eps: ddm_constant (same alpha, sigma and prior)."""
        return ddm_constant()

    def check_image_shape(self, shape) -> None:
        self.gaussian.check_image_shape(shape)

    def prior_sample(self, key, shape, index=None, data=None):
        """x_1 = eps ~ N(0, I): the offset vanishes at t = 1 and the image part is zero there."""
        return self.gaussian.prior_sample(key, shape, index=index, data=data)

    @staticmethod
    def targets(x0, slope):
        """The (a, C) head's targets: the slope a and C = -x_0 - a/2 (so that H_1 = -x_0)."""
        return slope, -x0 - 0.5 * slope

    def marginal(self, t):
        t = jnp.asarray(t, jnp.float32)
        t = t.reshape(t.shape + (1, 1, 1)) if t.ndim == 1 else t
        return 1.0 - t, jnp.sqrt(t)

    @staticmethod
    def offset(t, slope):
        """(a/2)(t^2 - t) for t of shape (B,) (or scalar) and slope a of the image's shape."""
        t = jnp.asarray(t, jnp.float32)
        t = t.reshape(t.shape + (1, 1, 1)) if t.ndim == 1 else t
        return 0.5 * slope * (t * t - t)

    def forward_sample(self, x0, t, key, index=None):
        """Returns (x_t, eps, a) with per-example noise and slope."""
        alpha, sigma = self.marginal(t)
        eps = per_example_normal(key, x0.shape, x0.dtype, index=index)
        slope = jnp.clip(per_example_normal(key, x0.shape, x0.dtype, index=index, step=1), -1.0, 1.0)
        return alpha * x0 + self.offset(t, slope) + sigma * eps, eps, slope


def ddm_linear() -> DDMLinearProcess:
    return DDMLinearProcess()


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

SPECTRAL_PROCESSES = ("blurring", "ihdm", "spd")
PROCESS_NAMES = (
    "vp_linear",
    "vp_cosine",
    "blurring",
    "ihdm",
    "spd",
    "ddm_constant",
    "ddm_linear",
    "rectified_flow",
)


def check_name(name: str, valid, what: str) -> str:
    """Raise a ValueError naming ``name`` and the closest valid choice."""
    if name not in valid:
        close = difflib.get_close_matches(str(name), list(valid), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint}; expected one of {sorted(valid)}")
    return name


def make(name: str, *, shape=None, spectrum=None, **kwargs: Any):
    """Build a process by name.

    ``shape`` (H, W, C) is required by "blurring" and "ihdm"; ``spectrum`` by "spd".
    """
    check_name(name, PROCESS_NAMES, "process")
    if name == "spd":
        if spectrum is None:
            raise ValueError("process 'spd' needs a spectrum (H, W, C); see spd_jax.diffusion.spectrum")
        return spd(spectrum, **kwargs)
    if name in ("blurring", "ihdm"):
        if shape is None:
            raise ValueError(f"process {name!r} needs the image shape (H, W, C)")
        return {"blurring": blurring, "ihdm": ihdm}[name](shape, **kwargs)
    return {
        "vp_linear": vp_linear,
        "vp_cosine": vp_cosine,
        "ddm_constant": ddm_constant,
        "ddm_linear": ddm_linear,
        "rectified_flow": rectified_flow,
    }[name](**kwargs)
