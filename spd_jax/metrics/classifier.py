"""A small digits classifier and the sample-quality scores built on it (weights-free metrics).

The classifier is an MLP (64 -> 256 -> 128 -> 10, ReLU) trained with full-batch AdamW on the
embedded digits training split (seeded, CPU seconds) and cached as .npz. Scores for a set of
images x in model units:

* ``classifier_score``: exp(E_x KL(p(y|x) || p(y))) with p(y) the mean prediction over the set,
  the Inception Score formula with this classifier (1 = uninformative, 10 = confident and
  balanced over the ten classes).
* ``classifier_confidence``: mean over x of max_y p(y|x).
* ``classifier_fd``: Fréchet distance between the 128-d penultimate features of the set and of a
  reference set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spd_jax.data import load_digits
from spd_jax.metrics.frechet import feature_frechet_distance
from spd_jax.metrics.inception import cache_dir

NUM_CLASSES = 10
#: Bumped whenever the training recipe changes, so stale caches are not reused.
RECIPE_VERSION = 1


class DigitsMLP(nn.Module):
    """images (B, 8, 8, 1) in [-1, 1] -> (logits (B, 10), penultimate features (B, hidden[-1]))."""

    hidden: tuple[int, ...] = (256, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(NUM_CLASSES)(h), h


class DigitsClassifier:
    """A trained :class:`DigitsMLP` with its digits test-split accuracy."""

    def __init__(self, params: dict, test_accuracy: float):
        self.params = params
        self.test_accuracy = float(test_accuracy)
        model = DigitsMLP()
        self._apply = jax.jit(lambda params, x: model.apply({"params": params}, x))

    def logits_and_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, 10) and penultimate features (N, 128) of images (N, 8, 8, 1), model units."""
        logits, features = self._apply(self.params, jnp.asarray(images, jnp.float32))
        return np.asarray(logits, np.float64), np.asarray(features, np.float64)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities p(y|x), (N, 10) float64."""
        logits, _ = self.logits_and_features(images)
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def save(self, path: str | os.PathLike) -> None:
        flat = {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, test_accuracy=self.test_accuracy, **{f"params/{k}": v for k, v in flat.items()})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DigitsClassifier:
        params: dict = {}
        with np.load(path) as data:
            for name in data.files:
                if not name.startswith("params/"):
                    continue
                node = params
                *parents, leaf = name.split("/")[1:]
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = jnp.asarray(data[name])
            accuracy = float(data["test_accuracy"])
        return cls(params, accuracy)


def _init_params(model: DigitsMLP, image_shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    """LeCun-normal kernels and zero biases drawn in NumPy (no init function to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]

    def draw(path, leaf):
        if path[-1].key == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def train_digits_classifier(
    *, seed: int = 0, num_steps: int = 1000, batch_size: int = 128, learning_rate: float = 2e-3,
    weight_decay: float = 1e-3, input_noise: float = 0.1,
) -> DigitsClassifier:
    """Train :class:`DigitsMLP` on the digits training split (split seed 0) with AdamW on random
    mini-batches and Gaussian input noise of std ``input_noise`` (model units); returns it with its
    test accuracy."""
    images, labels = load_digits("train", with_labels=True)
    test_images, test_labels = load_digits("test", with_labels=True)
    model = DigitsMLP()
    params = _init_params(model, images.shape[1:], np.random.default_rng(seed))
    key = jax.random.key(seed)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def loss_fn(params, step_key):
        batch_key, noise_key = jax.random.split(step_key)
        rows = jax.random.randint(batch_key, (batch_size,), 0, len(images))
        noisy = x[rows] + input_noise * jax.random.normal(noise_key, (batch_size, *x.shape[1:]))
        logits, _ = model.apply({"params": params}, noisy)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

    def step(carry, step_key):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.jit(lambda p, o, k: jax.lax.scan(step, (p, o), jax.random.split(k, num_steps)))(
        params, optimizer.init(params), key
    )
    classifier = DigitsClassifier(params, 0.0)
    predicted = classifier.probabilities(test_images).argmax(axis=-1)
    classifier.test_accuracy = float(np.mean(predicted == test_labels))
    return classifier


def load_digits_classifier(directory: str | os.PathLike | None = None, *, verbose: bool = True) -> DigitsClassifier:
    """The cached digits classifier from ``directory`` (default: the spd_jax user cache), trained
    and cached first if absent."""
    path = Path(directory if directory is not None else cache_dir()) / f"digits_classifier_v{RECIPE_VERSION}.npz"
    if path.exists():
        return DigitsClassifier.load(path)
    start = time.perf_counter()
    classifier = train_digits_classifier()
    classifier.save(path)
    if verbose:
        print(f"trained the digits classifier in {time.perf_counter() - start:.1f} s: "
              f"test accuracy {classifier.test_accuracy:.4f}; cached at {path}")
    return classifier


def classifier_score(probabilities: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) for class probabilities (N, K), with p(y) their mean over x."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def classifier_metrics(classifier: DigitsClassifier, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """{"classifier_score", "classifier_confidence", "classifier_fd"} of ``images`` (N, 8, 8, 1),
    the Fréchet distance against ``reference`` (M, 8, 8, 1); all in model units."""
    logits, features = classifier.logits_and_features(images)
    _, reference_features = classifier.logits_and_features(reference)
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    return {
        "classifier_score": classifier_score(probabilities),
        "classifier_confidence": float(probabilities.max(axis=1).mean()),
        "classifier_fd": feature_frechet_distance(features, reference_features),
    }
