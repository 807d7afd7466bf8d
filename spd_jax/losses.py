"""Training objectives (docs/math.md §5) as pure functions ``loss_fn(variables, batch, key) -> (loss, metrics)``.

Each factory closes over a model (anything with Flax's ``apply``) and a process:

* :func:`make_denoising_loss` — MSE on an eps / x0 / v / flow / score target, pixel space (§5.1);
* :func:`make_ddm_loss` — DDM's dual (c, eps) loss with per-sample time weights (§5.2);
* :func:`make_smd_loss` — SMD's official single-eta loss (§5.3);
* :func:`make_smd_mixture_loss` — SMD's K-sample log-mean-exp loss (§5.3, extension);
* :func:`make_projection_loss` — the predict-project network T_theta's loss (§5.4).

``batch`` is a dict: ``"image"`` (B, H, W, C) clean data x_0 in model units; optional ``"index"``
(B,) global example indices (default arange(B)); optional ``"cond"`` (B, H, W, C') conditioning
image passed to the model; optional ``"t"`` (B,) times to use instead of drawing them.

Randomness is per example (docs/math.md §0): times, noise and SMD's eta for example i come from
fold_in(key', index[i]), so a loss never depends on batch composition (up to dropout, whose masks
Flax draws per batch). Networks are called with ``train=True`` unless the factory's ``train=False``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spd_jax.diffusion import bases
from spd_jax.diffusion import parameterization as param
from spd_jax.diffusion.rng import example_keys, per_example_normal
from spd_jax.models.heads import DDM_HEADS, prediction_from_head
from spd_jax.tasks import Task, degrade

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
DDM_WEIGHTINGS = ("ddm_public", "adm_const", "adm_const2", "uniform")

# independent streams derived from the step key (fold_in constants)
_TIME, _NOISE, _DROPOUT, _ETA, _TARGET = range(5)


def _stream(key: jax.Array, which: int) -> jax.Array:
    return jax.random.fold_in(key, which)


def _per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _repeat(x: jax.Array, times: int) -> jax.Array:
    """``times`` copies of a batch stacked along the batch axis: (times * B, ...)."""
    return jnp.concatenate([x] * times)


def sample_times(
    process, key: jax.Array, batch_size: int, index=None, t_min: float = 1e-4, t_max: float = 1.0
) -> jax.Array:
    """Training times (B,): U(t_min, t_max) for continuous processes; for discrete processes a
    uniform level j at t = j/T among the levels in [t_min, t_max] (at least level 1). Example i's time
    depends only on (key, index[i])."""
    keys = example_keys(key, batch_size, index=index)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    levels = getattr(process, "num_levels", None)
    if levels is None:
        return t_min + (t_max - t_min) * u
    first = max(math.ceil(t_min * levels - 1e-9), 1)
    last = min(math.floor(t_max * levels + 1e-9), levels)
    if first > last:
        raise ValueError(
            f"no discrete level of {levels} lies in [t_min, t_max] = [{t_min}, {t_max}]"
        )
    j = first + jnp.floor(u * (last - first + 1)).astype(jnp.int32)
    return jnp.minimum(j, last).astype(jnp.float32) / levels


def _times(process, batch: dict, key, t_min: float, t_max: float) -> jax.Array:
    x0 = batch["image"]
    if "t" in batch:
        return jnp.asarray(batch["t"], jnp.float32)
    return sample_times(process, _stream(key, _TIME), x0.shape[0], batch.get("index"), t_min, t_max)


def _check_batch(batch: dict) -> jax.Array:
    if "image" not in batch:
        raise ValueError(f"batch must contain 'image' (B, H, W, C); got keys {sorted(batch)}")
    x0 = batch["image"]
    if x0.ndim != 4:
        raise ValueError(f"batch['image'] must have shape (B, H, W, C); got {x0.shape}")
    return x0


def _apply(model, variables, x_t, t, key, batch: dict, train: bool, eta=None):
    """One network call with the batch's conditioning and a dropout stream from ``key``."""
    extra = () if eta is None else (eta,)
    return model.apply(
        variables,
        x_t,
        t,
        *extra,
        cond=batch.get("cond"),
        train=train,
        rngs={"dropout": _stream(key, _DROPOUT)},
    )


# ---- eps / x0 / v / flow / score MSE (docs/math.md §5.1) --------------------------------------------


def _denoising_loss(model, process, target, t_min, t_max, train, latent_noise: bool) -> LossFn:
    if target not in param.TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {param.TARGETS}")

    def loss_fn(variables, batch: dict, key: jax.Array):
        x0 = _check_batch(batch)
        index = batch.get("index")
        t = _times(process, batch, key, t_min, t_max)
        x_t, eps = process.forward_sample(x0, t, _stream(key, _NOISE), index=index)
        y = param.target_from_x0_eps(process, x0, eps, t, target)
        eta = (
            per_example_normal(_stream(key, _ETA), x0.shape, x0.dtype, index=index)
            if latent_noise
            else None
        )
        out = _apply(model, variables, x_t, t, key, batch, train, eta)
        loss = jnp.mean(_per_example_mean((out - y) ** 2))
        return loss, {"loss": loss}

    return loss_fn


def make_denoising_loss(
    model: Any,
    process,
    *,
    target: str = "eps",
    t_min: float = 1e-4,
    t_max: float = 1.0,
    train: bool = True,
) -> LossFn:
    """Pixel-space MSE between the network output and ``target`` (docs/math.md §5.1), any process.

    x_t ~ q(x_t | x_0) per :meth:`Process.forward_sample`; t ~ U(t_min, t_max) (continuous) or a
    uniform discrete level. For ``target="eps"`` this is the eps-MSE, equal weight on every
    frequency. The model is called as ``model.apply(variables, x_t, t, cond=..., train=...)``.
    """
    return _denoising_loss(model, process, target, t_min, t_max, train, latent_noise=False)


# ---- DDM dual loss (docs/math.md §5.2) -------------------------------------------------------------


def ddm_loss_weights(weighting: str, t: jax.Array, t_min: float = 1e-4):
    """Per-sample weights (w_c, w_eps, w_rec), each (B,), of the DDM dual loss at times t (B,).

    ``"ddm_public"``: 1/t, 1/(1 - t + t_min), (1 - t)^2 (DDM-Public CIFAR-10);
    ``"adm_const"``: (t^2 - t + 1)/t, (t^2 - t + 1)/(1 - t + t_min), -log(t)/2;
    ``"adm_const2"``: ((1 - t)^2 + t^2)/t^2, (t/(1 - t + t_min))^2 + 1, -log(t)/2;
    ``"uniform"``: 1, 1, 0.
    """
    t = jnp.asarray(t, jnp.float32)
    if weighting == "ddm_public":
        return 1.0 / t, 1.0 / (1.0 - t + t_min), (1.0 - t) ** 2
    if weighting == "adm_const":
        v = t * t - t + 1.0
        return v / t, v / (1.0 - t + t_min), -0.5 * jnp.log(t)
    if weighting == "adm_const2":
        return (
            ((1.0 - t) ** 2 + t * t) / (t * t),
            (t / (1.0 - t + t_min)) ** 2 + 1.0,
            -0.5 * jnp.log(t),
        )
    if weighting == "uniform":
        ones = jnp.ones_like(t)
        return ones, ones, jnp.zeros_like(t)
    raise ValueError(f"unknown DDM weighting {weighting!r}; expected one of {DDM_WEIGHTINGS}")


def make_ddm_loss(
    model: Any,
    process,
    *,
    head: str = "ddm_dual",
    weighting: str = "ddm_public",
    rec_weight: float = 1.0,
    t_min: float = 1e-4,
    t_max: float = 1.0,
    train: bool = True,
) -> LossFn:
    """DDM's dual loss (docs/math.md §5.2), weighted per sample and elementwise:

        L = mean_b [ w_c(t_b) |c_hat - c|^2 + w_eps(t_b) |eps_hat - eps|^2 + rec_weight w_rec(t_b) R_b ]

    with c = -x_0, |.|^2 the per-sample mean over pixels and R_b the per-sample mean L1 error of
    x0_hat = x_t - (1 - alpha) c_hat - sigma eps_hat (the official LPIPS term is not included).
    ``head="ddm_dual"``: the model returns (c, eps) from two decoders; ``"ddm_c"``: it returns c
    and eps is derived. ``process`` must be frequency-independent (ddm_constant, rectified_flow).

    ``head="ddm_linear"`` with process ``ddm_linear`` (docs/math.md §2.6b): the first decoder
    predicts (a, C), the targets being the example's slope a and C = -x_0 - a/2, and |c_hat - c|^2
    is the mean over both; x0_hat = x_t - H_t(a_hat, C_hat) - sqrt(t) eps_hat.
    """
    linear = head == "ddm_linear"
    if head not in DDM_HEADS + ("ddm_linear",):
        raise ValueError(f"make_ddm_loss needs a DDM head {DDM_HEADS + ('ddm_linear',)}; got {head!r}")
    if linear != (getattr(process, "name", None) == "ddm_linear"):
        raise ValueError(f"head 'ddm_linear' and process 'ddm_linear' go together; got head {head!r} "
                         f"with process {getattr(process, 'name', process)!r}")
    if not getattr(process, "is_scalar", False):
        raise ValueError(
            f"the DDM dual loss needs a frequency-independent Process; got {process!r}"
        )
    if weighting not in DDM_WEIGHTINGS:
        raise ValueError(f"unknown DDM weighting {weighting!r}; expected one of {DDM_WEIGHTINGS}")

    def loss_fn(variables, batch: dict, key: jax.Array):
        x0 = _check_batch(batch)
        t = _times(process, batch, key, t_min, t_max)
        if linear:
            x_t, eps, slope = process.forward_sample(x0, t, _stream(key, _NOISE), index=batch.get("index"))
        else:
            x_t, eps = process.forward_sample(x0, t, _stream(key, _NOISE), index=batch.get("index"))
        pred = prediction_from_head(process, x_t, t, _apply(model, variables, x_t, t, key, batch, train), head)
        if linear:
            slope_target, c_target = process.targets(x0, slope)
            loss_c = 0.5 * _per_example_mean((pred.a - slope_target) ** 2 + (pred.c - c_target) ** 2)
        else:
            loss_c = _per_example_mean((pred.c + x0) ** 2)
        loss_eps = _per_example_mean((pred.eps - eps) ** 2)
        loss_rec = _per_example_mean(jnp.abs(pred.x0 - x0))
        w_c, w_eps, w_rec = ddm_loss_weights(weighting, t, t_min)
        loss = jnp.mean(w_c * loss_c + w_eps * loss_eps + rec_weight * w_rec * loss_rec)
        metrics = {
            "loss": loss,
            "mse_c": jnp.mean(loss_c),
            "mse_eps": jnp.mean(loss_eps),
            "l1_x0": jnp.mean(loss_rec),
        }
        return loss, metrics

    return loss_fn


# ---- SMD (docs/math.md §5.3) -----------------------------------------------------------------------


def make_smd_loss(
    model: Any,
    process,
    *,
    target: str = "eps",
    t_min: float = 1e-4,
    t_max: float = 1.0,
    train: bool = True,
) -> LossFn:
    """SMD's official single-eta loss: the MSE of :func:`make_denoising_loss` with one
    eta ~ N(0, I) per example fed to the latent network, ``model.apply(variables, x_t, t, eta, ...)``.

    Its optimum ignores eta (plain DDPM, docs/math.md §5.3); :func:`make_smd_mixture_loss` rewards the latent.
    """
    return _denoising_loss(model, process, target, t_min, t_max, train, latent_noise=True)


def make_smd_mixture_loss(
    model: Any,
    process,
    *,
    num_samples: int = 8,
    step: float | None = None,
    target: str = "eps",
    variance_scale: float = 1.0,
    bandwidth: float = 0.0,
    t_min: float = 1e-4,
    t_max: float = 1.0,
    train: bool = True,
) -> LossFn:
    """SMD's K-sample log-mean-exp loss (docs/math.md §5.3; an spd_jax extension), per frequency k:

        L = [ -logsumexp_j( -sum_k |u_s(k) - mu_j(k)|^2 / (2 s^2(k)) ) + log K ] / n

    for a reverse step t -> s = t - ``step``: u_s ~ q(u_s | u_t, u_0) (docs/math.md eq. 1.3, mu_j its mean
    with u_0 replaced by the x0_hat implied by the network at eta_j (j = 1..K), component variance
    s^2 = ``variance_scale`` x the posterior variance, n pixels per example (a per-pixel NLL up to
    a constant). ``step`` defaults to one level of a discrete process and must be given for a
    continuous one; t is drawn from [t_min + step, t_max] so that s > 0 (a ``batch["t"]`` must
    exceed ``step``).

    ``bandwidth`` tau > 0 (pixel units of x_0) adds coef_u0^2 tau^2 to every component's variance,
    s^2 = ``variance_scale`` x posterior variance + (coef_u0 tau)^2, which keeps the step to s = 0
    well defined (there u_s = u_0 and the loss is a K-sample log-mean-exp of N(u_0; u0_hat_j, tau^2)).
    Then t is drawn from [t_min, t_max] and s = max(t - ``step``, 0), so the last step is trained
    too; ``step`` may exceed t_max (every step then ends at s = 0).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if target not in param.TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {param.TARGETS}")
    levels = process.num_levels
    if step is None:
        if levels is None:
            raise ValueError(
                "make_smd_mixture_loss needs step= (the reverse step in t) for a continuous process"
            )
        step = 1.0 / levels
    if not bandwidth >= 0:
        raise ValueError(f"bandwidth must be >= 0; got {bandwidth}")
    if not (0 < step < t_max or (bandwidth > 0 and step > 0)):
        raise ValueError(f"step must lie in (0, t_max) (any step > 0 with a bandwidth); got step={step}, t_max={t_max}")
    basis = param.basis_of(process)

    def loss_fn(variables, batch: dict, key: jax.Array):
        x0 = _check_batch(batch)
        index = batch.get("index")
        batch_size, k = x0.shape[0], num_samples
        if bandwidth > 0:
            t = _times(process, batch, key, t_min, t_max)
            s = jnp.maximum(t - step, 0.0)
        else:
            t = _times(process, batch, key, t_min + step, t_max)
            s = t - step
        x_t, _ = process.forward_sample(x0, t, _stream(key, _NOISE), index=index)
        _, coef_u0, std = process.posterior(t, s)
        fresh = per_example_normal(_stream(key, _TARGET), x0.shape, x0.dtype, index=index)
        etas = jnp.concatenate(
            [
                per_example_normal(_stream(key, _ETA), x0.shape, x0.dtype, index=index, step=j)
                for j in range(k)
            ]
        )
        x_rep, t_rep = _repeat(x_t, k), _repeat(t, k)
        tiled = dict(batch, cond=_repeat(batch["cond"], k)) if "cond" in batch else batch
        out = _apply(model, variables, x_rep, t_rep, key, tiled, train, etas)
        x0_hat = param.prediction_from_output(process, x_rep, t_rep, out, target).x0
        # u_s - mu_j = coef_u0 (u_0 - u0_hat_j) + std * xi, xi = B xi_pix
        error = bases.to_spectral(_repeat(x0, k) - x0_hat, basis)
        resid = coef_u0 * error.reshape(
            (k, batch_size) + x0.shape[1:]
        ) + std * bases.to_spectral(fresh, basis)
        variance = variance_scale * std**2 + (coef_u0 * bandwidth) ** 2
        energy = jnp.sum(jnp.abs(resid) ** 2 / (2.0 * variance), axis=(2, 3, 4))
        nll = -jax.nn.logsumexp(-energy, axis=0) + jnp.log(k)
        loss = jnp.mean(nll) / x0[0].size
        return loss, {
            "loss": loss,
            "min_energy_per_pixel": jnp.mean(jnp.min(energy, axis=0)) / x0[0].size,
        }

    return loss_fn


# ---- predict-project projection network (docs/math.md §5.4) ----------------------------------------


def _drift(process, t):
    """(f, g^2) of the forward SDE du = f u dt + g dW_B at t (B,), per frequency (docs/math.md §1.2)."""
    alpha, sigma = process.marginal(t)
    dalpha, dsigma = param.marginal_derivative(process, t)
    f = dalpha / alpha
    return f, 2.0 * sigma * dsigma - 2.0 * f * sigma**2


def predict_step(process, x_t: jax.Array, t: jax.Array, eps: jax.Array, dt: float) -> jax.Array:
    """One Euler-Maruyama drift step of the reverse SDE from t to t - dt, without noise (docs/math.md §6.6):
    u_pred = u - f u dt - g^2 (eps_hat / sigma) dt per frequency; pixel space in and out."""
    basis = param.basis_of(process)
    _, sigma = process.marginal(t)
    f, g2 = _drift(process, t)
    u, u_eps = bases.to_spectral(x_t, basis), bases.to_spectral(eps, basis)
    return bases.from_spectral(u - f * u * dt - g2 * (u_eps / sigma) * dt, basis)


def default_projection_beta(process, t: jax.Array, dt: float) -> jax.Array:
    """beta of the projection step t -> t - dt per frequency: g^2(t) dt at the step's start, the
    convention the training-free predict-project sampler uses too (docs/math.md §5.4, §6.6)."""
    return _drift(process, t)[1] * dt


def make_projection_loss(
    model: Any,
    process,
    denoiser: param.Denoiser,
    *,
    num_steps: int,
    beta_fn: Callable[[jax.Array], jax.Array] | None = None,
    t_min: float = 1e-3,
    t_max: float = 1.0 - 1e-3,
    train: bool = True,
) -> LossFn:
    """Loss of the projection network T_theta (docs/math.md §5.4), per example and frequency k:

        mean_k |x_pred + T(x_pred, t') - m_{t'}(x_0)|^2(k) + sqrt(beta_k)/2 |T(x_pred, t')|^2(k)

    where x_t ~ q(x_t | x_0), x_pred = :func:`predict_step` with the frozen ``denoiser``'s eps and
    dt = 1/``num_steps``, t' = t - dt and m_{t'}(x_0) = alpha_{t'} u_0 (the forward mean). t is drawn
    from U(t_min + dt, t_max) (or read from ``batch["t"]``); beta is ``beta_fn(t)`` at the step's
    start, by default :func:`default_projection_beta` g^2(t) dt. The pointwise minimiser is
    T*(x) = 2/(2 + sqrt(beta)) (E[m_{t'} | x_pred = x] - x). The process must be continuous.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if process.num_levels is not None:
        raise ValueError(
            f"the projection loss needs a continuous process; {process.name!r} is discrete"
        )
    dt = 1.0 / num_steps
    beta_fn = beta_fn or (lambda t: default_projection_beta(process, t, dt))
    basis = param.basis_of(process)

    def loss_fn(variables, batch: dict, key: jax.Array):
        x0 = _check_batch(batch)
        t = _times(process, batch, key, t_min + dt, t_max)
        t_next = t - dt
        x_t, _ = process.forward_sample(x0, t, _stream(key, _NOISE), index=batch.get("index"))
        eps_hat = denoiser(x_t, t, key=_stream(key, _ETA)).eps
        x_pred = jax.lax.stop_gradient(predict_step(process, x_t, t, eps_hat, dt))
        out = _apply(model, variables, x_pred, t_next, key, batch, train)
        alpha_next, _ = process.marginal(t_next)
        fit = _per_example_mean((x_pred + out - process.apply(x0, alpha_next)) ** 2)
        u_out = bases.to_spectral(out, basis)
        penalty = _per_example_mean(0.5 * jnp.sqrt(beta_fn(t)) * jnp.abs(u_out) ** 2)
        loss = jnp.mean(fit + penalty)
        return loss, {"loss": loss, "mse": jnp.mean(fit)}

    return loss_fn


def conditioned_loss(loss_fn: LossFn, task: Task) -> LossFn:
    """``loss_fn`` with the batch's conditioning image of ``task`` added (``loss_fn`` itself for
    unconditional generation).

    The conditioning is computed inside the loss from the clean images, the step key and the
    global example indices (``batch["index"]``), so it stays pure and device-count invariant.
    """
    if not task.conditional:
        return loss_fn

    def conditioned(params, batch, key):
        d = degrade(task, batch["image"], key, batch.get("index"))
        return loss_fn(params, dict(batch, cond=jax.lax.stop_gradient(d.cond)), key)

    return conditioned
