"""The 2-D mixture toy (docs/math.md §7.4) as a data set, its exact scores and posterior, the MLP
denoisers with and without SMD's latent, and the smd_claim benchmark's pipeline."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_smd, toy_smd
from spd_jax import data, losses
from spd_jax.diffusion import processes
from spd_jax.metrics.mixture import mixture_scores, posterior_x0_moments
from spd_jax.models import SMDNet, model_denoiser
from spd_jax.models.mlp import MLP, smd_mlp
from spd_jax.run import builders, checks, evaluate


def test_mixture2d_is_a_seeded_point_cloud_of_the_7x7_mixture():
    train, test = data.load_mixture2d("train"), data.load_mixture2d("test")
    assert train.shape == (data.MIXTURE_SIZES["train"], 1, 1, 2) and train.dtype == np.float32
    np.testing.assert_array_equal(train, data.load_mixture2d("train"))
    assert not np.allclose(train[: len(test)], test)
    # every component is used about equally, and true draws score 1 - e^-4.5 on-mode
    nearest = np.argmin(np.sum((train.reshape(-1, 1, 2) - data.mixture_means()[None]) ** 2, -1), axis=1)
    counts = np.bincount(nearest, minlength=49)
    assert counts.min() > 0.8 * len(train) / 49
    assert mixture_scores(test)["on_mode"] == pytest.approx(1 - np.exp(-4.5), abs=0.006)
    # the data pipeline accepts the values past [-1, 1] of the edge components
    batch = next(iter(data.make_pipeline(data.image_source("mixture2d"), batch_size=8, seed=0)))["image"]
    assert batch.shape == (8, 1, 1, 2) and np.abs(train).max() > 1.0


def test_mixture_scores_separate_modes_from_the_gaps_between_them():
    means = data.mixture_means()
    on = mixture_scores(means)
    gaps = mixture_scores(means[:-1] + np.array([1 / 6, 0.0]))  # halfway between neighbours
    assert on["on_mode"] == 1.0 and gaps["on_mode"] == 0.0
    assert on["nll"] < gaps["nll"] - 5.0


@pytest.mark.parametrize("t", [0.05, 0.3, 0.8])
def test_exact_posterior_obeys_the_law_of_total_variance(t):
    """E_xt[spread^2] + Var(E[x0 | x_t]) = Var(x_0) (both summed over the two coordinates)."""
    process = processes.make("vp_linear", shape=(1, 1, 2))
    x0 = data.load_mixture2d("train")
    x_t, _ = process.forward_sample(jnp.asarray(x0), jnp.full((len(x0),), t), jax.random.key(0))
    alpha, sigma = (float(np.asarray(a).ravel()[0]) for a in process.marginal64(np.array([t])))
    mean, spread = posterior_x0_moments(np.asarray(x_t), alpha, sigma)
    total = np.sum(np.var(x0.reshape(-1, 2), axis=0))
    assert np.mean(spread**2) + np.sum(np.var(mean, axis=0)) == pytest.approx(total, rel=0.03)
    # and the posterior mean is an unbiased estimate of x0
    np.testing.assert_allclose(np.mean(mean - x0.reshape(-1, 2), axis=0), 0.0, atol=0.02)


def _randomised(variables, key):
    """Variables with every zero-initialised weight replaced by noise (so every input matters)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)])


def test_smd_mlp_output_depends_on_eta_and_the_plain_mlp_is_deterministic():
    model = smd_mlp(MLP(width=32, num_blocks=1), latent_dim=4, latent_width=16)
    assert isinstance(model, SMDNet)
    x, t = jnp.ones((3, 1, 1, 2)) * 0.3, jnp.full((3,), 0.4)
    variables = _randomised(model.init(jax.random.key(0), x, t, x), jax.random.key(1))
    process = processes.make("vp_linear", shape=(1, 1, 2))
    den = model_denoiser(model, variables, process, "eps")
    a, b = den(x, t, key=jax.random.key(2)).x0, den(x, t, key=jax.random.key(3)).x0
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(a, den(x, t, key=jax.random.key(2)).x0)
    with pytest.raises(ValueError, match="pass key="):
        den(x, t)
    plain = MLP(width=32, num_blocks=1)
    pv = _randomised(plain.init(jax.random.key(0), x, t), jax.random.key(1))
    out = plain.apply(pv, x, t)
    assert out.shape == x.shape and float(jnp.std(out)) > 0
    with pytest.raises(ValueError, match="no conditioning"):
        plain.apply(pv, x, t, cond=x)


def test_the_bandwidth_k_sample_loss_trains_the_last_step_and_rewards_the_latent():
    """With a bandwidth, steps ending at s = 0 are well defined: the K-sample loss of x_0 itself
    (docs/math.md §5.3 at the last step) prefers a latent that picks a mode over the mean."""
    process = processes.make("vp_linear", shape=(1, 1, 2))
    signs = np.where(np.random.default_rng(3).uniform(size=256) < 0.5, -0.5, 0.5)
    batch = {"image": jnp.asarray(signs[:, None, None, None] * np.ones((256, 1, 1, 2)), jnp.float32),
             "t": jnp.full((256,), 0.05)}

    class Oracle:  # x0 head: the mean (0) or a mode picked by the sign of eta's first coordinate
        def __init__(self, use_eta):
            self.use_eta = use_eta

        def apply(self, variables, x_t, t, eta, cond=None, train=False, rngs=None):
            pick = jnp.sign(eta[..., :1]) * 0.5 * jnp.ones_like(x_t)
            return pick if self.use_eta else jnp.zeros_like(x_t)

    def loss(model):
        fn = losses.make_smd_mixture_loss(model, process, num_samples=8, step=1.0, bandwidth=0.04, target="x0")
        return float(jax.jit(fn)({}, batch, jax.random.key(0))[0])

    mode, mean = loss(Oracle(True)), loss(Oracle(False))
    assert np.isfinite(mode) and np.isfinite(mean)
    assert mode < 0.1 * mean
    with pytest.raises(ValueError, match="step must lie"):
        losses.make_smd_mixture_loss(Oracle(True), process, step=1.0)  # no bandwidth: s would reach 0


@pytest.mark.parametrize("module", [toy_smd, digits_smd])
@pytest.mark.parametrize("variant", ["plain", "single_eta", "mixture"])
def test_every_smd_claim_config_is_valid_and_builds(module, variant):
    config = module.get_config(variant)
    checks.validate(config, device_count=1)
    assert (config.model.kind in checks.SMD_KINDS) == (variant != "plain")
    assert isinstance(builders.build_model(config), SMDNet) == (variant != "plain")


@pytest.mark.parametrize("field, value, message", [
    ("process.spectrum", "estimate", "no image spectrum"),
    ("process.name", "spd", "a scalar process"),
    ("sample.grid_images", 16, "no PNG grids"),
    ("model.mlp_width", 30, "a multiple of 4"),
])
def test_point_cloud_configs_fail_clearly(field, value, message):
    config = toy_smd.get_config("mixture")
    block, leaf = field.split(".")
    config[block][leaf] = value
    with pytest.raises(checks.ConfigError, match=message):
        checks.validate(config, device_count=1)


def test_image_evaluation_of_a_point_cloud_points_to_the_mixture_scores():
    config = copy.deepcopy(toy_smd.get_config("plain"))
    with pytest.raises(checks.ConfigError, match="smd_claim"):
        evaluate.check(config)


def test_smd_claim_smoke_trains_scores_and_measures_the_latent(tmp_path):
    from benchmarks import smd_claim

    result = smd_claim.run("mixture2d", tmp_path, variants=("mixture",), steps=(2,), overrides=smd_claim.SMOKE,
                           num=200, spread=(16, 4), log=lambda *_: None)
    rows = {(r["model"], r["steps"]): r for r in result["scores"]}
    assert rows["mixture", 2]["sampler"] == "smd" and rows["mixture", 2]["nfe"] == 2
    # the oracle ceilings of docs/math.md §7.4: the exact mixture kernel keeps the modes, the
    # exact-mean Gaussian kernel loses most of them
    assert rows["oracle: exact mixture kernel", 2]["on_mode"] > 0.9
    assert rows["oracle: exact posterior mean", 2]["on_mode"] < 0.6
    spread = result["spread"]
    assert [r["t"] for r in spread] == list(smd_claim.SPREAD_TIMES)
    assert all(r["model_spread"] > 0 for r in spread)  # the latent reaches x0_hat
    exact = [r["exact_spread"] for r in spread]
    assert exact == sorted(exact) and exact[-1] > 0.8  # posteriors widen with t
    assert "| mixture | smd |" in smd_claim.markdown("mixture2d", result, (2,))
