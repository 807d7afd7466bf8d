"""Networks (docs/math.md §8): U-Net, prediction heads, DDM dual decoder, SMD latent net + hypernetwork."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.diffusion import bases, processes
from spd_jax.models import (
    HEADS,
    HyperAdapter,
    UNet,
    model_denoiser,
    prediction_from_head,
    smd_net,
    time_label,
    unet,
)
from spd_jax.models.param_counts import count_parameters, parameter_shapes
from spd_jax.models.presets import spd_cifar10

# tests compile many small programs: skip LLVM optimisation (same numerics, 2-4x faster compiles)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TINY = dict(
    base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2
)
SHAPE = (3, 8, 8, 2)


def random_variables(model, seed, *args, **kwargs):
    """Variables of ``model`` filled from NumPy (no XLA compile of the initialisers): kernels
    N(0, 1/fan_in), GroupNorm scales near 1, everything else small, none zero."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else 0.1 * noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def inputs():
    return normal(0, SHAPE), jnp.array([0.2, 0.5, 0.8])


@pytest.fixture(scope="module")
def tiny_unet():
    model = UNet(dropout=0.5, **TINY)
    return model, random_variables(model, 1, *inputs()), jit(model.apply, static_argnames="train")


@pytest.fixture(scope="module")
def dual_unet():
    model = UNet(num_decoders=2, decouple=True, resample="resblock", **TINY)
    return model, random_variables(model, 2, *inputs())


def toy_spd_process():
    h, w, _ = SHAPE[1:]
    mag = bases.frequency_magnitude(h, w, "dft")
    return processes.spd((2.0 / (0.5 + mag) ** 2)[:, :, None])


def test_unet_keeps_shape_and_dtype_and_dropout_acts_only_in_training(tiny_unet):
    model, variables, apply = tiny_unet
    x, t = inputs()
    out = apply(variables, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out, apply(variables, x, t))
    drop_a = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(0)})
    drop_b = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    assert float(jnp.max(jnp.abs(drop_a - drop_b))) > 1e-3
    # the time input matters
    assert float(jnp.max(jnp.abs(out - apply(variables, x, t[::-1])))) > 1e-4


def test_unet_output_of_example_does_not_depend_on_batch(tiny_unet):
    model, variables, apply = tiny_unet
    x, t = inputs()
    full = apply(variables, x, t)
    single = apply(variables, x[1:2], t[1:2])
    np.testing.assert_allclose(full[1:2], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("process_name", ["vp_cosine", "spd"])
def test_every_single_head_gives_a_consistent_prediction(tiny_unet, process_name):
    """x_t = alpha x0_hat + sigma eps_hat per frequency, for every head, scalar or spectral process."""
    model, variables, apply = tiny_unet
    process = processes.vp_cosine() if process_name == "vp_cosine" else toy_spd_process()
    x, t = inputs()
    output = apply(variables, x, t)
    alpha, sigma = process.marginal(t)
    x0s = {}
    for head in ("eps", "x0", "v", "flow", "score"):
        pred = prediction_from_head(process, x, t, output, head)
        for field in (pred.x0, pred.eps):
            assert field.shape == x.shape and field.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(field)))
        rebuilt = process.apply(pred.x0, alpha) + process.apply(pred.eps, sigma)
        np.testing.assert_allclose(rebuilt, x, rtol=1e-4, atol=1e-4)
        x0s[head] = pred.x0
    # the head decides how the same output is read
    assert float(jnp.max(jnp.abs(x0s["eps"] - x0s["x0"]))) > 1e-2
    assert float(jnp.max(jnp.abs(x0s["v"] - x0s["flow"]))) > 1e-2


def test_model_denoiser_follows_the_contract(tiny_unet):
    model, variables, apply = tiny_unet
    process = processes.vp_cosine()
    x, t = inputs()
    pred = jit(model_denoiser(model, variables, process, "v"))(x, t)
    expected = prediction_from_head(process, x, t, apply(variables, x, t), "v")
    np.testing.assert_allclose(pred.x0, expected.x0, rtol=1e-5, atol=1e-5)
    assert pred.c is None
    with pytest.raises(ValueError, match="unknown prediction head"):
        model_denoiser(model, variables, process, "epsilon")


def test_ddm_dual_head_has_two_decoders_sharing_one_encoder(dual_unet):
    model, variables = dual_unet
    assert set(variables["params"]) == {"time_embed", "encoder", "decoder_0", "decoder_1"}
    assert "decouple" in variables["params"]["decoder_0"]
    process = processes.ddm_constant()
    x, t = inputs()
    pred = jit(model_denoiser(model, variables, process, "ddm_dual"))(x, t)
    c, eps = pred.c, pred.eps
    assert c.shape == eps.shape == pred.x0.shape == x.shape
    assert float(jnp.max(jnp.abs(c - eps))) > 1e-3  # two different decoders
    alpha, sigma = process.marginal(t)
    np.testing.assert_allclose(pred.x0, x - (1 - alpha) * c - sigma * eps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="two decoders"):
        prediction_from_head(process, x, t, c, "ddm_dual")


def test_ddm_single_decoder_head_derives_eps_from_c(tiny_unet):
    model, variables, apply = tiny_unet
    process = processes.rectified_flow()
    x, t = inputs()
    c = apply(variables, x, t)
    pred = prediction_from_head(process, x, t, c, "ddm_c")
    np.testing.assert_allclose(pred.x0, -c, rtol=1e-5, atol=1e-5)
    alpha, sigma = process.marginal(t)
    np.testing.assert_allclose(alpha * pred.x0 + sigma * pred.eps, x, rtol=1e-5, atol=1e-5)
    assert set(HEADS) >= {"eps", "x0", "v", "ddm_dual", "ddm_c"}


def test_conditioning_image_enters_the_network():
    model = UNet(
        base_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        cond_channels=1,
    )
    x, t = inputs()
    cond = jnp.ones(SHAPE[:3] + (1,))
    variables = random_variables(model, 3, x, t, cond=cond)
    apply = jit(model.apply)
    out_a = apply(variables, x, t, cond=cond)
    out_b = apply(variables, x, t, cond=-cond)
    assert out_a.shape == x.shape
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4
    with pytest.raises(ValueError, match="needs cond"):
        model.apply(variables, x, t)


def test_unet_rejects_malformed_inputs(tiny_unet):
    model, variables, apply = tiny_unet
    x, t = inputs()
    with pytest.raises(ValueError, match="t must have shape"):
        model.apply(variables, x, t[:2])
    with pytest.raises(ValueError, match="divisible"):
        model.apply(variables, x[:, :7, :7], t)


def test_time_labels():
    t = jnp.array([0.25, 1.0])
    np.testing.assert_allclose(time_label(t), [250.0, 1000.0])
    np.testing.assert_allclose(time_label(t, "log"), np.log([0.25, 1.0]), rtol=1e-6)
    levels = 4000
    i = jnp.array([0, 17, 3999])
    np.testing.assert_allclose(
        time_label((i + 1) / levels, "discrete", num_levels=levels), i * 1000 / levels
    )
    with pytest.raises(ValueError, match="unknown time_embedding"):
        time_label(t, "sigma")


def test_hypernetwork_efficient_form_equals_explicit_matrices():
    """u (u . h') + softplus(s) h' == (u u^T + softplus(s) I) h', layer by layer (docs/math.md §8)."""
    d, width = 12, 10
    h, z = normal(0, (2, 4, 4, width)), normal(1, (2, 4, 4, d))
    fast = HyperAdapter(d, depth=3)
    slow = HyperAdapter(d, depth=3, materialize=True)
    variables = random_variables(fast, 4, h, z)
    out_fast = jit(fast.apply)(variables, h, z)
    out_slow = jit(slow.apply)(variables, h, z)
    np.testing.assert_allclose(out_fast, out_slow, rtol=1e-4, atol=1e-4)  # float32, sums over d in different orders
    assert float(jnp.max(jnp.abs(out_fast - h))) > 1e-2  # the adapter is not the identity


@pytest.fixture(scope="module")
def tiny_smd():
    model = smd_net(UNet(**TINY), latent_dim=4, latent_base_channels=8, latent_channel_mult=(1,))
    x, t = inputs()
    return model, random_variables(model, 5, x, t, jnp.zeros_like(x))


def test_smd_latent_and_denoiser_change_with_eta(tiny_smd):
    model, variables = tiny_smd
    x, t = inputs()
    eta_a, eta_b = normal(10, x.shape), normal(11, x.shape)
    latent = jit(lambda v, eta: model.apply(v, x, t, eta, method=model.latent))
    z_a, z_b = latent(variables, eta_a), latent(variables, eta_b)
    assert z_a.shape == SHAPE[:3] + (4,)
    assert float(jnp.max(jnp.abs(z_a - z_b))) > 1e-3
    np.testing.assert_array_equal(z_a, latent(variables, eta_a))
    # hypernetworks sit at both sites of the denoiser
    denoiser_params = variables["params"]["denoiser"]
    assert "hyper_in" in denoiser_params["encoder"] and "hyper_out" in denoiser_params["decoder_0"]
    # the SMD denoiser draws eta from its key
    denoiser = model_denoiser(model, variables, processes.vp_cosine(), "eps")
    with pytest.raises(ValueError, match="pass key"):
        denoiser(x, t)
    run = jit(lambda key: denoiser(x, t, key=key))
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert a.x0.shape == x.shape and a.eps.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a.eps - b.eps))) > 1e-4


def test_smd_latent_noise_is_per_example_for_every_key_layout():
    """eta of example b depends on (key, b) only: one base key, or one key per example (raw or
    typed, as the smd sampler passes them), and a split batch draws the same rows."""
    from spd_jax.models.heads import latent_noise

    shape = (6, 4, 4, 2)
    base = jax.random.PRNGKey(3)
    whole = latent_noise(base, shape, jnp.float32)
    np.testing.assert_array_equal(whole[:2], latent_noise(base, (2,) + shape[1:], jnp.float32))
    assert float(jnp.std(whole)) > 0.5
    raw = jax.random.split(base, shape[0])
    rows = latent_noise(raw, shape, jnp.float32)
    np.testing.assert_array_equal(rows[4], jax.random.normal(raw[4], shape[1:]))
    np.testing.assert_array_equal(rows[3:], latent_noise(raw[3:], (3,) + shape[1:], jnp.float32))
    typed = jax.random.split(jax.random.key(3), shape[0])
    np.testing.assert_array_equal(latent_noise(typed, shape, jnp.float32)[1], jax.random.normal(typed[1], shape[1:]))
    assert not np.allclose(rows[0], rows[1])


def test_spd_cifar10_unet_has_52_5m_parameters():
    count = count_parameters(parameter_shapes(spd_cifar10(), (32, 32, 3)))
    assert abs(count / 52.5e6 - 1.0) < 0.01, count


# ---- GroupNorm and attention: the fast forms equal the textbook ones --------------------------


def group_norm_float64(x, groups, scale, bias, eps=1e-5):
    """The definition in float64: per example and group, (x - mean) / sqrt(var + eps) * scale + bias,
    with the mean and variance over the spatial axes and the group's channels (x is (B, H, W, C))."""
    x64 = np.asarray(x, np.float64)
    g = x64.reshape(x64.shape[:-1] + (groups, -1))
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    normed = ((g - mean) / np.sqrt(var + eps)).reshape(x64.shape)
    return normed * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


class FastLayersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_group_norm_equals_the_float64_definition_and_flax_gradients(self):
        """group_norm equals its float64 definition even with large channel offsets; its gradients
        equal those of flax.linen.GroupNorm, whose parameters (scale, bias) it shares."""
        groups, eps = 4, 1e-5
        x = normal(3, (2, 5, 6, 12)) * 3.0 + normal(4, (1, 1, 1, 12)) * 20.0  # large channel offsets
        scale, bias = 1.0 + 0.3 * normal(5, (12,)), normal(6, (12,))
        out = self.variant(lambda x, s, b: unet.group_norm(x, s, b, groups, eps))(x, scale, bias)
        np.testing.assert_allclose(out, group_norm_float64(x, groups, scale, bias, eps), atol=2e-5, rtol=1e-5)

        flax_norm = nn.GroupNorm(num_groups=groups, epsilon=eps)
        params = {"params": {"scale": scale, "bias": bias}}
        assert jax.tree.structure(flax_norm.init(jax.random.key(0), x)) == jax.tree.structure(params)
        y = normal(7, x.shape) * 0.1  # a moderate input: flax's one-pass variance is exact enough here
        weights = normal(8, x.shape)
        ours = self.variant(jax.grad(
            lambda p, y: jnp.sum(weights * unet.GroupNorm(groups, eps).apply(p, y)), argnums=(0, 1)))(params, y)
        theirs = jax.grad(lambda p, y: jnp.sum(weights * flax_norm.apply(p, y)), argnums=(0, 1))(params, y)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

    def test_group_norm_refuses_channels_it_cannot_group(self):
        with pytest.raises(ValueError, match="12 channels cannot be split into 5 groups"):
            unet.group_norm(jnp.zeros((1, 2, 2, 12)), jnp.ones(12), jnp.zeros(12), 5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_film_is_flax_dense_split_in_two_with_the_same_parameters_and_values(self):
        """FiLM adds the bias after splitting, not before: the same parameters (names, shapes, initial
        values) as flax.linen.Dense(2C), bitwise the same scale and shift, and the same gradients."""
        emb, channels = normal(11, (3, 16)), 5
        dense, film = nn.Dense(2 * channels), unet.FiLM(channels)
        init_dense, init_film = dense.init(jax.random.key(1), emb), film.init(jax.random.key(1), emb)
        chex.assert_trees_all_equal(init_film, init_dense)  # same tree, shapes and values
        variables = random_variables(film, 12, emb)
        variables["params"]["bias"] = normal(13, (2 * channels,))
        scale, shift = self.variant(film.apply)(variables, emb)
        expected = dense.apply(variables, emb)
        np.testing.assert_array_equal(scale, expected[:, :channels])
        np.testing.assert_array_equal(shift, expected[:, channels:])

        weights = normal(14, (3, 2 * channels))
        ours = self.variant(jax.grad(lambda v: jnp.sum(weights * jnp.concatenate(film.apply(v, emb), -1))))(variables)
        theirs = jax.grad(lambda v: jnp.sum(weights * dense.apply(v, emb)))(variables)
        chex.assert_trees_all_close(ours, theirs, atol=1e-6, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attention_is_multi_head_softmax_attention_with_qkv_heads_in_channel_order(self):
        """Against a float64 NumPy transcription: GroupNorm, qkv = h W + b whose 3 * heads blocks of
        C / heads channels are q heads, then k heads, then v heads; softmax(q k^T / sqrt(d)) v per
        head; heads concatenated in order; output projection; residual."""
        heads, channels = 2, 8
        model = unet.SelfAttention(num_heads=heads, norm_groups=2)
        x = normal(9, (2, 3, 4, channels))
        variables = random_variables(model, 10, x)
        out = self.variant(model.apply)(variables, x)

        p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
        x64 = np.asarray(x, np.float64)
        h = group_norm_float64(x64, 2, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, 12, channels)
        qkv = (h @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(2, 12, 3 * heads, channels // heads)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads:2 * heads], qkv[:, :, 2 * heads:]
        logits = np.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(channels // heads)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhc->bqhc", w, v).reshape(2, 12, channels)
        expected = x64 + (attended @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(x.shape)
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
