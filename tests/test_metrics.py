"""Metrics: Fréchet distance, KID, SWD, the FID Inception port and its weight conversion, the
digits classifier, and the FID small-sample protocol."""

import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spd_jax.data import load_digits
from spd_jax.metrics import classifier, convert, frechet, inception, kid, protocol, swd


def _random_features(rng, n, d, scale=1.0, shift=0.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return shift + scale * rng.standard_normal((n, d)) @ mixing


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def test_sqrtm_psd_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20))
    psd = a.T @ a
    np.testing.assert_allclose(frechet.sqrtm_psd(psd), scipy.linalg.sqrtm(psd).real, rtol=1e-8, atol=1e-10)
    s1, s2 = psd, np.cov(rng.standard_normal((50, 20)), rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(1)
    x, y = _random_features(rng, 400, 24), _random_features(rng, 300, 24, scale=1.3, shift=0.2)
    mu1, s1 = np.mean(x, 0), np.cov(x, rowvar=False)
    mu2, s2 = np.mean(y, 0), np.cov(y, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet.feature_frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n", [500, 10])  # full-rank and rank-deficient (N < D) covariances
def test_frechet_distance_of_a_set_with_itself_is_zero(n):
    x = _random_features(np.random.default_rng(2), n, 32)
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet.feature_frechet_distance(x, x)) < 1e-12 * scale


def test_frechet_distance_low_rank_route_matches_covariances():
    rng = np.random.default_rng(12)
    x, y = _random_features(rng, 30, 64), _random_features(rng, 20, 64, scale=0.7, shift=0.1)
    via_covariances = frechet.frechet_distance(*frechet.gaussian_statistics(x), *frechet.gaussian_statistics(y))
    # rank-deficient square roots carry ~sqrt(machine eps) round-off; the Gram route does not
    assert frechet.feature_frechet_distance(x, y) == pytest.approx(via_covariances, rel=1e-7)


def test_frechet_distance_of_a_translation_is_the_squared_shift():
    x = _random_features(np.random.default_rng(3), 200, 8)
    shift = np.arange(8) / 8.0
    assert frechet.feature_frechet_distance(x, x + shift) == pytest.approx(shift @ shift, rel=1e-8)


def test_pixel_frechet_distance_flattens_images():
    images = np.random.default_rng(4).uniform(-1, 1, size=(50, 4, 4, 2))
    assert frechet.pixel_frechet_distance(images, images + 0.5) == pytest.approx(0.25 * 32, rel=1e-8)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet.pixel_frechet_distance(images, images[:, :2])


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((5, 3)) + 1.0

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = np.mean([k(x[i], x[j]) for i in range(6) for j in range(6) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(5) for j in range(5) if i != j])
    xy = np.mean([k(a, b) for a in x for b in y])
    assert kid.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same, same_std = kid.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = kid.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * max(abs(same), same_std)


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein distance
# ---------------------------------------------------------------------------------------------


def test_laplacian_pyramid_reconstructs_the_image():
    images = np.random.default_rng(7).uniform(-1, 1, size=(3, 32, 32, 3))
    levels = swd.laplacian_pyramid(images, 3)
    assert [level.shape[1] for level in levels] == [32, 16, 8]
    rebuilt = levels[-1]
    for level in reversed(levels[:-1]):
        rebuilt = level + swd.pyramid_up(rebuilt)
    np.testing.assert_allclose(rebuilt, images, atol=1e-12)


def test_pyramid_resolutions_stop_at_the_descriptor_and_minimum_size():
    assert swd.pyramid_resolutions(32, 32) == [32, 16]
    assert swd.pyramid_resolutions(8, 8) == [8]
    assert swd.pyramid_resolutions(64, 64, min_resolution=8) == [64, 32, 16, 8]


def test_swd_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    images = load_digits("test")[:120]
    kwargs = dict(descriptors_per_image=16, num_repeats=2, directions_per_repeat=32)
    assert swd.sliced_wasserstein_distance(images, images, **kwargs)["swd"] == 0.0
    other = load_digits("train")[:120]
    floor = swd.sliced_wasserstein_distance(images, other, **kwargs)["swd"]
    shifted = swd.sliced_wasserstein_distance(images, other + 0.3, **kwargs)["swd"]
    noisy = swd.sliced_wasserstein_distance(
        images, other + 0.5 * np.random.default_rng(0).standard_normal(other.shape), **kwargs)["swd"]
    assert 0 < 2 * floor < min(shifted, noisy)


def test_swd_per_set_normalization_is_blind_to_brightness_like_the_paper():
    images = np.random.default_rng(8).uniform(-1, 1, size=(40, 16, 16, 3))
    kwargs = dict(descriptors_per_image=8, num_repeats=1, directions_per_repeat=16)
    paper = swd.sliced_wasserstein_distance(images, 0.5 * images + 0.2, per_set_normalization=True, **kwargs)
    ours = swd.sliced_wasserstein_distance(images, 0.5 * images + 0.2, **kwargs)
    assert paper["swd"] < 1e-3 < 100 < ours["swd"]
    assert set(ours) == {"swd", "swd_16px"}


# ---------------------------------------------------------------------------------------------
# Inception port
# ---------------------------------------------------------------------------------------------


def test_inception_layer_shapes_and_parameter_count():
    model = inception.FIDInceptionV3()
    x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    features, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables, x)
    shapes = {name: v["__call__"][0].shape for name, v in state["intermediates"].items() if name != "__call__"}
    expected = {
        "Conv2d_1a_3x3": (2, 149, 149, 32), "Conv2d_2a_3x3": (2, 147, 147, 32), "Conv2d_2b_3x3": (2, 147, 147, 64),
        "Conv2d_3b_1x1": (2, 73, 73, 80), "Conv2d_4a_3x3": (2, 71, 71, 192),
        "Mixed_5b": (2, 35, 35, 256), "Mixed_5c": (2, 35, 35, 288), "Mixed_5d": (2, 35, 35, 288),
        "Mixed_6a": (2, 17, 17, 768), "Mixed_6b": (2, 17, 17, 768), "Mixed_6c": (2, 17, 17, 768),
        "Mixed_6d": (2, 17, 17, 768), "Mixed_6e": (2, 17, 17, 768),
        "Mixed_7a": (2, 8, 8, 1280), "Mixed_7b": (2, 8, 8, 2048), "Mixed_7c": (2, 8, 8, 2048),
    }
    assert shapes == expected
    assert features.shape == (2, inception.FEATURE_DIM)
    # torchvision's inception_v3 has 27,161,264 parameters; without the auxiliary head (3,326,696)
    # and the 1000-class fc layer (2,049,000) that leaves 21,785,568.
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == 21_785_568


def test_bilinear_resize_follows_pytorch_align_corners_false():
    np.testing.assert_allclose(inception.bilinear_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    x = np.random.default_rng(9).standard_normal((1, 13, 17, 3)).astype(np.float32)
    for size in (299, 7):
        ours = np.einsum("ph,bhwc,qw->bpqc", inception.bilinear_matrix(13, size), x, inception.bilinear_matrix(17, size))
        reference = jax.image.resize(x, (1, size, size, 3), "linear", antialias=False)
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_preprocess_quantises_resizes_and_repeats_grey_channels():
    grey = jnp.linspace(-1, 1, 64).reshape(1, 8, 8, 1)
    out = inception.preprocess(grey, size=16)
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    levels = (np.asarray(inception.preprocess(grey, size=8)) + 1) / 2 * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_pooling_excludes_padding_like_pytorch_fid():
    ones = jnp.ones((1, 5, 5, 2))
    np.testing.assert_allclose(inception._avg_pool_3x3(ones), ones)  # count_include_pad=False
    negative = -jnp.arange(1.0, 26.0).reshape(1, 5, 5, 1)
    pooled = inception._max_pool_3x3(negative, 1)
    assert pooled.shape == negative.shape and float(pooled[0, 0, 0, 0]) == -1.0  # -inf padding, not zeros
    assert inception._max_pool_3x3(ones, 2).shape == (1, 2, 2, 2)


# ---------------------------------------------------------------------------------------------
# .pth reading and conversion (synthetic files written in both PyTorch formats, without torch)
# ---------------------------------------------------------------------------------------------

_STORAGE_NAMES = {np.dtype(v): k for k, v in convert._STORAGE_DTYPES.items()}


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(s):
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _int_tuple(values):
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _torch_pickle(tensors, legacy):
    """Protocol-2 pickle of an OrderedDict of tensors, as torch.save writes it: tensors are
    _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks) calls whose storages
    are persistent ids ('storage', torch.<Type>Storage, key, 'cpu', numel[, view])."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R("]
    for name, (key, dtype, numel, offset, size, stride) in tensors.items():
        pid = b"(" + _text("storage") + _global("torch", _STORAGE_NAMES[np.dtype(dtype)]) + _text(key)
        pid += _text("cpu") + b"J" + struct.pack("<i", numel) + (b"N" if legacy else b"") + b"tQ"
        out += [_text(name), _global("torch._utils", "_rebuild_tensor_v2"), b"(", pid,
                b"J" + struct.pack("<i", offset), _int_tuple(size), _int_tuple(stride), b"\x89",
                _global("collections", "OrderedDict"), b")R", b"tR"]
    return b"".join(out) + b"u."


def _element_strides(a):
    return tuple(s // a.itemsize for s in a.strides)


def _layout(state):
    """Storages and tensor views for ``state``. Names ending in ".T" (the transpose) or ".row1"
    (the second row) are views into the storage of the name without the suffix."""
    storages, tensors, keys = {}, {}, {}
    for name, value in state.items():
        base_name, _, view = name.rpartition(".")
        if view == "T":
            base = state[base_name]
            tensors[name] = (keys[base_name], base.dtype, base.size, 0, base.T.shape, _element_strides(base.T))
        elif view == "row1":
            base = state[base_name]
            tensors[name] = (keys[base_name], base.dtype, base.size, base.shape[1], base.shape[1:], (1,))
        else:
            value = np.ascontiguousarray(value)
            keys[name] = str(len(storages))
            storages[keys[name]] = value
            tensors[name] = (keys[name], value.dtype, value.size, 0, value.shape, _element_strides(value))
    return storages, tensors


def _write_pth(path, state, legacy):
    storages, tensors = _layout(state)
    data = _torch_pickle(tensors, legacy)
    if not legacy:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/byteorder", "little")
            archive.writestr("archive/version", "3\n")
            for key, value in storages.items():
                archive.writestr(f"archive/data/{key}", value.tobytes())
        return
    with open(path, "wb") as f:
        for header in (convert._LEGACY_MAGIC, convert._LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(data)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_reader_without_torch(tmp_path, legacy):
    rng = np.random.default_rng(10)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    shared = rng.standard_normal((3, 5))
    state = {"a.conv.weight": weight, "shared": shared, "shared.T": shared.T, "shared.row1": shared[1],
             "bn.num_batches_tracked": np.array(7, np.int64), "half": rng.standard_normal(6).astype(np.float16)}
    path = tmp_path / "weights.pth"
    _write_pth(path, state, legacy)
    loaded = convert.read_state_dict(path, reader="pickle")
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)


def test_pth_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + _global("os", "system") + _text("true") + b"\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert.read_state_dict(path, reader="pickle")


def _torch_conv_bn_relu(x, weight, gamma, beta, mean, var, stride):
    """PyTorch semantics in NumPy: cross-correlation of x (H, W, I) with weight (O, I, kh, kw), no
    padding, then eval-mode batch norm (eps 1e-3) and ReLU."""
    out_c, _, kh, kw = weight.shape
    h = (x.shape[0] - kh) // stride + 1
    w = (x.shape[1] - kw) // stride + 1
    y = np.zeros((h, w, out_c))
    for i in range(h):
        for j in range(w):
            patch = x[i * stride : i * stride + kh, j * stride : j * stride + kw]
            y[i, j] = np.einsum("hwi,oihw->o", patch, weight)
    return np.maximum((y - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)


def test_conversion_round_trips_a_synthetic_pytorch_fid_state_dict(tmp_path):
    rng = np.random.default_rng(11)
    shapes = convert.torch_state_dict_shapes()
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    state = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    for name in state:
        if name.endswith("running_var"):
            state[name] = np.abs(state[name]) + 0.5
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # present in the real file, unused
    pth = tmp_path / "pt_inception.pth"
    _write_pth(pth, state, legacy=False)
    target = convert.convert(pth, tmp_path / "inception.npz", reader="pickle")
    variables = inception.load_variables(target)

    kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  state["Mixed_7c.branch_pool.bn.running_var"])
    abstract = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)

    x = rng.uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
    first = {c: variables[c]["Conv2d_1a_3x3"] for c in variables}
    ours = inception.BasicConv2d(32, (3, 3), strides=(2, 2)).apply(first, x)
    reference = _torch_conv_bn_relu(x[0], *(state[f"Conv2d_1a_3x3.{n}"] for n in (
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")), stride=2)
    np.testing.assert_allclose(ours[0], reference, rtol=1e-5, atol=1e-6)

    extractor = inception.InceptionFeatures(target, batch_size=2)
    assert not extractor.official and "precision=highest" in extractor.identity
    digits = load_digits("test")[:3]
    features = extractor(digits)
    assert features.shape == (3, 2048) and np.all(np.isfinite(features))
    np.testing.assert_allclose(extractor(digits[2:]), features[2:], rtol=1e-4, atol=1e-5)  # padding-independent

    del state["Mixed_5b.branch_pool.bn.running_mean"]
    with pytest.raises(KeyError, match="missing"):
        convert.convert_state_dict(state)


# ---------------------------------------------------------------------------------------------
# digits classifier
# ---------------------------------------------------------------------------------------------


def test_digits_classifier_accuracy_and_cache(tmp_path):
    trained = classifier.load_digits_classifier(tmp_path, verbose=False)
    assert trained.test_accuracy > 0.9
    cached = classifier.load_digits_classifier(tmp_path)
    assert cached.test_accuracy == trained.test_accuracy
    test = load_digits("test")
    np.testing.assert_allclose(cached.probabilities(test), trained.probabilities(test), atol=1e-6)
    scores = classifier.classifier_metrics(cached, test, test)
    assert scores["classifier_score"] > 9 and scores["classifier_confidence"] > 0.9
    assert abs(scores["classifier_fd"]) < 1e-6


def test_classifier_score_limits():
    assert classifier.classifier_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)
    assert classifier.classifier_score(np.eye(10)[np.arange(50) % 10]) == pytest.approx(10.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# FID protocol
# ---------------------------------------------------------------------------------------------


def _stamp(**kwargs):
    base = dict(num_samples=1000, inception=True, allow_small_sample=False, seed=0, weights="ema",
                last_step="x0_hat at t = 0", reference={"name": "test"}, fid_reference={"name": "train"})
    return protocol.protocol_stamp(**{**base, **kwargs})


def test_fid_small_sample_protection():
    with pytest.raises(protocol.SmallSampleError, match="50000"):
        _stamp()
    stamp = _stamp(allow_small_sample=True)
    assert stamp["small_sample_override"] and stamp["fid_status"].startswith("OVERRIDE")
    assert "OVERRIDE" in protocol.format_stamp(stamp)
    assert _stamp(num_samples=50_000)["fid_status"] == "met"
    assert _stamp(inception=False)["fid_status"].startswith("not applicable")
