"""Per-example randomness (docs/math.md §0): the noise of example i at step j is
normal(fold_in(fold_in(key, i), j)), so results never depend on batch position, chunking,
device count or process count."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def example_index(batch: int, index=None):
    """Global example indices: ``index`` if given (shape (B,)), else arange(B)."""
    if index is None:
        return jnp.arange(batch, dtype=jnp.uint32)
    index = jnp.asarray(index)
    if index.shape != (batch,):
        raise ValueError(f"index must have shape ({batch},) to match the batch; got {index.shape}")
    return index.astype(jnp.uint32)


def example_keys(key, batch: int, index=None, step=None):
    """Keys of shape (B,): fold_in(key, i) for every example i, then fold_in(., step) if given."""
    idx = example_index(batch, index)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    if step is not None:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return keys


def per_example_normal(key, shape, dtype=jnp.float32, index=None, step=None):
    """Standard normal array of ``shape`` (B, ...) whose row i depends only on (key, i, step)."""
    keys = example_keys(key, shape[0], index=index, step=step)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(keys)
