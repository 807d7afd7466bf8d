"""Training objectives (docs/math.md §5): every model family fits a tiny batch; the losses' claims hold."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spd_jax import losses
from spd_jax.diffusion import bases, processes
from spd_jax.diffusion.parameterization import Prediction
from spd_jax.models import UNet, model_projection, smd_net
from tests.test_models import random_variables

# tests compile many small programs: skip LLVM optimisation (same numerics, 2-4x faster compiles)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TINY = dict(
    base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=2
)
IMAGE = (8, 8, 1)


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def tiny_batch(seed=0, size=8):
    """A fixed batch of smooth random images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (size, 4, 4, 1))
    return {"image": jnp.asarray(np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2), jnp.float32)}


def fit(loss_fn, variables, batch, steps=30, lr=3e-3):
    """Adam on a fixed batch with a fresh key per step; returns the loss on fixed keys before/after."""
    value_and_grad = jit(jax.value_and_grad(loss_fn, has_aux=True))
    optimizer = optax.adam(lr)
    update = jit(optimizer.update)
    state = optimizer.init(variables)
    eval_keys = [jax.random.key(10_000 + i) for i in range(4)]

    def evaluate(v):
        return float(np.mean([value_and_grad(v, batch, k)[0][0] for k in eval_keys]))

    before = evaluate(variables)
    for step in range(steps):
        (loss, _), grads = value_and_grad(variables, batch, jax.random.key(step))
        assert np.isfinite(float(loss))
        updates, state = update(grads, state, variables)
        variables = optax.apply_updates(variables, updates)
    return before, evaluate(variables)


def toy_spectrum():
    mag = bases.frequency_magnitude(IMAGE[0], IMAGE[1], "dft")
    return (2.0 / (0.5 + mag) ** 2)[:, :, None]


def gaussian_denoiser(process, data_var):
    """Exact denoiser for x_0 ~ N(0, data_var I) under a scalar process (docs/math.md §7.1)."""

    def denoiser(x_t, t, *, key=None):
        alpha, sigma = process.marginal(t)
        var = alpha**2 * data_var + sigma**2
        return Prediction(x0=alpha * data_var / var * x_t, eps=sigma / var * x_t)

    return denoiser


# ---- every model family overfits a tiny batch ---------------------------------------------


def test_eps_loss_fits_a_tiny_batch_under_spd():
    model = UNet(**TINY)
    process = processes.spd(toy_spectrum())
    batch = tiny_batch()
    t = jnp.full((8,), 0.5)
    variables = jit(model.init)(jax.random.key(0, impl="rbg"), batch["image"], t)  # Flax's own init
    before, after = fit(losses.make_denoising_loss(model, process, target="eps"), variables, batch)
    assert after < 0.75 * before, (before, after)


def test_ddm_dual_loss_fits_a_tiny_batch():
    model = UNet(num_decoders=2, decouple=True, resample="resblock", time_embedding="log", **TINY)
    batch = tiny_batch(1)
    variables = random_variables(model, 1, batch["image"], jnp.full((8,), 0.5))
    loss_fn = losses.make_ddm_loss(model, processes.ddm_constant(), weighting="adm_const")
    before, after = fit(loss_fn, variables, batch)
    assert after < 0.75 * before, (before, after)


def test_smd_mixture_loss_fits_a_tiny_batch():
    model = smd_net(UNet(**TINY), latent_dim=4, latent_base_channels=8, latent_channel_mult=(1,))
    batch = tiny_batch(2)
    x = batch["image"]
    variables = random_variables(model, 2, x, jnp.full((8,), 0.5), x)
    loss_fn = losses.make_smd_mixture_loss(
        model, processes.vp_linear(num_steps=25), num_samples=2, target="eps"
    )
    before, after = fit(loss_fn, variables, batch)
    assert after < 0.75 * before, (before, after)


def test_projection_loss_fits_a_tiny_batch():
    model = UNet(**TINY)
    process = processes.vp_linear()
    batch = tiny_batch(3)
    variables = random_variables(model, 3, batch["image"], jnp.full((8,), 0.5))
    denoiser = gaussian_denoiser(process, float(jnp.mean(batch["image"] ** 2)))
    loss_fn = losses.make_projection_loss(model, process, denoiser, num_steps=10)
    before, after = fit(loss_fn, variables, batch)
    assert after < 0.75 * before, (before, after)


# ---- DDM dual loss (docs/math.md §5.2) --------------------------------------------------------------


class DDMOracle:
    """Returns the exact DDM targets (c = -x_0, eps from x_t), reading x_0 from ``cond``."""

    def __init__(self, process, head, c_error=0.0):
        self.process, self.head, self.c_error = process, head, c_error

    def apply(self, variables, x_t, t, cond=None, train=False, rngs=None):
        alpha, sigma = self.process.marginal(t)
        c = -cond + self.c_error * x_t
        eps = (x_t - alpha * cond) / sigma
        return (c, eps) if self.head == "ddm_dual" else c


@pytest.mark.parametrize("weighting", losses.DDM_WEIGHTINGS)
@pytest.mark.parametrize("head", ["ddm_dual", "ddm_c"])
def test_ddm_loss_vanishes_at_the_exact_targets(weighting, head):
    process = processes.ddm_constant() if head == "ddm_dual" else processes.rectified_flow()
    batch = tiny_batch(4)
    batch["cond"] = batch["image"]
    for c_error, zero in ((0.0, True), (0.1, False)):
        oracle = DDMOracle(process, head, c_error)
        loss, metrics = losses.make_ddm_loss(oracle, process, head=head, weighting=weighting)(
            {}, batch, jax.random.key(0)
        )
        assert (float(loss) < 1e-6) == zero, (c_error, float(loss), metrics)


def test_ddm_loss_weights_each_sample_by_its_own_time():
    """Per-sample weighting: the batch loss is the mean of single-example losses (the official
    code's (B,) x (B, 1) broadcast would weight every sample by the batch-mean weight)."""
    process = processes.ddm_constant()
    images = tiny_batch(5, size=6)["image"]
    batch = {"image": images, "cond": images, "index": jnp.arange(10, 16)}
    oracle = DDMOracle(process, "ddm_dual", c_error=0.3)
    loss_fn = jit(losses.make_ddm_loss(oracle, process, weighting="ddm_public"))
    key = jax.random.key(1)
    full = float(loss_fn({}, batch, key)[0])
    singles = [
        float(loss_fn({}, {k: v[i : i + 1] for k, v in batch.items()}, key)[0]) for i in range(6)
    ]
    np.testing.assert_allclose(full, np.mean(singles), rtol=1e-5)
    assert np.std(singles) > 0.1 * np.mean(singles)  # times (and so weights) differ across samples


# ---- per-example randomness ------------------------------------------------------------------


class PixelNet(nn.Module):
    """A per-pixel linear map of (x_t, t): a cheap stand-in network."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        time = jnp.broadcast_to(t[:, None, None, None], x.shape[:3] + (1,))
        return nn.Dense(x.shape[-1])(jnp.concatenate([x, time], axis=-1))


def test_denoising_loss_does_not_depend_on_batch_composition():
    model = PixelNet()
    process = processes.spd(toy_spectrum())
    batch = dict(tiny_batch(6, size=6), index=jnp.arange(100, 106))
    variables = random_variables(model, 6, batch["image"], jnp.zeros(6))
    loss_fn = losses.make_denoising_loss(model, process, target="v")
    key = jax.random.key(3)
    loss_fn = jit(loss_fn)
    full = loss_fn(variables, batch, key)[0]
    head = loss_fn(variables, {k: v[:2] for k, v in batch.items()}, key)[0]
    tail = loss_fn(variables, {k: v[2:] for k, v in batch.items()}, key)[0]
    np.testing.assert_allclose(full, (2 * head + 4 * tail) / 6, rtol=1e-5)


def test_training_times_are_per_example_and_respect_discrete_levels():
    key = jax.random.key(7)
    cont = losses.sample_times(processes.vp_cosine(), key, 64, t_min=0.2, t_max=0.6)
    assert float(cont.min()) >= 0.2 and float(cont.max()) <= 0.6
    disc = np.asarray(losses.sample_times(processes.vp_linear(num_steps=25), key, 64, t_min=0.35))
    np.testing.assert_allclose(disc * 25, np.round(disc * 25), atol=1e-4)
    assert disc.min() >= 0.36 - 1e-6 and disc.max() <= 1.0 + 1e-6 and len(np.unique(disc)) > 3
    shifted = losses.sample_times(processes.vp_cosine(), key, 3, index=jnp.array([5, 6, 7]))
    full = losses.sample_times(processes.vp_cosine(), key, 8)
    np.testing.assert_array_equal(shifted, full[5:])


# ---- SMD (docs/math.md §5.3) ---------------------------------------------------------------------------


class TwoPointOracle:
    """x0-head oracles for data x_0 = +-a (equal weights): the posterior mean (ignores eta), or a
    guess of one mode chosen by the sign of mean(eta)."""

    def __init__(self, process, amplitude, use_eta):
        self.process, self.amplitude, self.use_eta = process, amplitude, use_eta

    def apply(self, variables, x_t, t, eta, cond=None, train=False, rngs=None):
        if self.use_eta:
            sign = jnp.sign(jnp.mean(eta, axis=(1, 2, 3), keepdims=True))
            return sign * self.amplitude * jnp.ones_like(x_t)
        alpha, sigma = self.process.marginal(t)
        score = alpha * self.amplitude * jnp.sum(x_t, axis=(1, 2, 3), keepdims=True) / sigma**2
        return self.amplitude * jnp.tanh(score) * jnp.ones_like(x_t)


def test_smd_single_eta_loss_prefers_the_mean_and_the_mixture_loss_rewards_the_latent():
    """docs/math.md §5.3: the official single-eta MSE is minimised by ignoring eta, while the K-sample
    log-mean-exp loss prefers a model that uses eta to pick a mode of a bimodal reverse step."""
    process, amplitude, size = processes.vp_linear(), 0.5, 512
    signs = np.where(np.random.default_rng(8).uniform(size=size) < 0.5, -1.0, 1.0)
    batch = {
        "image": jnp.asarray(
            signs[:, None, None, None] * amplitude * np.ones((size, 4, 4, 1)), jnp.float32
        ),
        "t": jnp.full((size,), 0.6),
    }
    key = jax.random.key(9)
    mean_model = TwoPointOracle(process, amplitude, use_eta=False)
    mode_model = TwoPointOracle(process, amplitude, use_eta=True)

    def single(model):
        return float(jit(losses.make_smd_loss(model, process, target="x0"))({}, batch, key)[0])

    def mixture(model):
        loss_fn = losses.make_smd_mixture_loss(model, process, num_samples=8, step=0.5, target="x0")
        return float(jit(loss_fn)({}, batch, key)[0])

    assert single(mean_model) < 0.8 * single(mode_model)
    assert mixture(mode_model) < 0.5 * mixture(mean_model)


# ---- predict-project projection network (docs/math.md §5.4) -------------------------------------------


class Scale(nn.Module):
    """T(x, t') = w x with one scalar w."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        return self.param("w", nn.initializers.zeros, ()) * x


def test_projection_loss_minimiser_matches_the_closed_form():
    """T*(x) = 2/(2 + sqrt(beta)) (E[m_t' | x_pred = x] - x) for Gaussian data, VP-linear, an exact
    score model and beta = g^2(t) dt = beta_VP(t) dt at the step's start (docs/math.md §5.4)."""
    data_var, t, dt = 0.8, 0.4, 0.1
    process = processes.vp_linear()
    batch = {"image": normal(10, (1024,) + IMAGE, np.sqrt(data_var)), "t": jnp.full((1024,), t)}
    loss_fn = losses.make_projection_loss(
        Scale(), process, gaussian_denoiser(process, data_var), num_steps=int(round(1 / dt))
    )

    def loss_of_w(w):
        return loss_fn({"params": {"w": w}}, batch, jax.random.key(11))[0]

    slope, curvature = jit(lambda w: (jax.grad(loss_of_w)(w), jax.grad(jax.grad(loss_of_w))(w)))(
        0.0
    )
    w_star = float(-slope / curvature)  # the loss is quadratic in w

    def vp(s):  # alpha, sigma^2, beta(s) of the score-SDE VP process, in float64
        integral = 0.1 * s + 9.95 * s * s
        return np.exp(-0.5 * integral), -np.expm1(-integral), 0.1 + 19.9 * s

    alpha, sigma2, beta = vp(t)
    alpha_next, _, _ = vp(t - dt)
    var = alpha**2 * data_var + sigma2
    gain = 1.0 + 0.5 * beta * dt - beta * dt / var  # x_pred = gain * x_t (f = -beta/2, g^2 = beta)
    regression = alpha_next * alpha * data_var / (gain * var)  # E[m | x_pred] = regression * x_pred
    expected = 2.0 / (2.0 + np.sqrt(beta * dt)) * (regression - 1.0)
    assert abs(w_star - expected) < 0.01, (w_star, expected)
    assert abs(regression - 1.0 - expected) > 0.05  # the shrinkage is visible
    # a trained T_theta is read back as projection(x_pred, t_next)
    x = batch["image"][:2]
    projection = model_projection(Scale(), {"params": {"w": w_star}})
    np.testing.assert_allclose(projection(x, jnp.full((2,), t - dt)), w_star * x, rtol=1e-6)


@pytest.mark.parametrize("name", ["vp_linear", "spd"])
def test_projection_loss_and_predict_project_sampler_use_one_beta(name):
    """The trained projection network and the training-free sampler shrink by the same
    2/(2 + sqrt(beta)), beta = g^2(t) dt at each step's start, on every frequency."""
    from spd_jax.diffusion import samplers, spectrum

    process = processes.vp_linear() if name == "vp_linear" else processes.spd(spectrum.power_law((8, 8, 1)))
    plan = samplers.plan(process, method="predict_project", num_steps=20, grid="uniform_t")
    levels = np.asarray(plan.grid)
    for i in (0, 7, 15):
        t, dt = levels[i], levels[i] - levels[i + 1]
        beta = np.asarray(losses.default_projection_beta(process, jnp.full((1,), t, jnp.float32), dt))
        shrink = np.broadcast_to(np.asarray(plan.tables["shrink"][i]), np.shape(beta)[1:])
        np.testing.assert_allclose(2.0 / (2.0 + np.sqrt(beta[0])), shrink, rtol=2e-3)
