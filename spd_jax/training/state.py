"""Training state, optimiser, EMA and the mesh-sharded train step.

* :class:`TrainState` holds params, EMA params, the optax state, the step count and the base key;
  the key of step n is ``fold_in(rng, n)``, so a resumed run draws the same noise as an
  uninterrupted one.
* :func:`make_train_step` builds the pure ``train_step(state, batch) -> (state, metrics)`` for a
  loss ``loss_fn(params, batch, key) -> (loss, metrics)``; :func:`scan_steps` runs several of
  them per dispatch with ``lax.scan``.
* :func:`shard_train_step` jits a step over a 1-D ``jax.sharding.Mesh`` (batch split on ``data``,
  state replicated and donated); :func:`global_batch` assembles a global batch from each
  process's local rows.

Batches are dicts ``{"image": (B, H, W, C)}`` in model units; the train step adds ``"index"``, the
example's position in the *global* batch, so the per-example noise (docs/math.md §0) does not depend on
the device or process count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spd_jax.losses import LossFn
from spd_jax.training import compile_cache

DATA_AXIS = "data"
SCHEDULES = ("constant", "cosine")



class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue exactly.

    Attributes:
      step: int32 scalar, optimiser steps attempted so far (skipped ones included).
      params: model parameters.
      ema_params: exponential moving average of ``params`` (what samples are drawn from).
      opt_state: optax state.
      rng: base PRNG key (uint32[2]); step n uses ``fold_in(rng, n)``.
      skipped: int32 scalar, total updates skipped because they were non-finite.
      nonfinite_streak: int32 scalar, skipped updates in a row up to now.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    nonfinite_streak: jax.Array


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """Fresh state at step 0; the EMA starts at the initial params."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jnp.asarray(rng, jnp.uint32),
        skipped=zero,
        nonfinite_streak=zero,
    )


def learning_rate_schedule(
    learning_rate: float, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None,
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then constant or cosine decay.

    ``cosine`` decays from ``learning_rate`` to ``end_factor * learning_rate`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(f"cosine schedule needs total_steps > warmup_steps; got {total_steps}, {warmup_steps}")
        after = optax.cosine_decay_schedule(learning_rate, total_steps - warmup_steps, alpha=end_factor)
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    schedule: optax.Schedule,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping (``grad_clip=None`` or <= 0: no clipping)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip is None or grad_clip <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def ema_decay(num_updates, ema: float):
    """EMA decay with warm-up (docs/math.md §10): min(ema, (1 + n) / (10 + n)) after n updates."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(ema, (1.0 + n) / (10.0 + n))


def all_finite(tree) -> jax.Array:
    """True iff every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, ema: float, schedule: optax.Schedule | None = None
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure single step ``train_step(state, batch) -> (state, metrics)``.

    An update that would make the loss, the gradients or any parameter non-finite is skipped:
    params, EMA and optimiser state stay as they were, ``step`` still advances (the batch is
    consumed), and ``metrics["skipped"]`` is 1.
    Metrics: loss, grad_norm (before clipping), lr, ema_decay, skipped, plus the loss's own.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch = dict(batch)
        batch["index"] = jnp.arange(batch["image"].shape[0], dtype=jnp.uint32)
        key = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updates_done = state.step - state.skipped
        decay = ema_decay(updates_done, ema)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        ok = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
        bad = (~ok).astype(jnp.int32)
        # lax.cond, not a per-leaf jnp.where: the select of every leaf compiles ~5x slower on CPU
        params, ema_params, opt_state = jax.lax.cond(
            ok,
            lambda: (params, ema_params, opt_state),
            lambda: (state.params, state.ema_params, state.opt_state),
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema_params,
            opt_state=opt_state,
            skipped=state.skipped + bad,
            nonfinite_streak=(state.nonfinite_streak + 1) * bad,
        )
        metrics = dict(aux)
        metrics.update(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            ema_decay=decay,
            skipped=bad,
        )
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(updates_done), jnp.float32)
        return new_state, metrics

    return train_step


def scan_steps(train_step: Callable) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Run ``train_step`` over batches stacked on a leading axis (K, B, ...) with ``lax.scan``.

    Metrics are averaged over the K steps, except ``skipped`` (summed); ``nonfinite_streak`` is
    the state's value after the last step. On CPU keep K = 1: XLA:CPU runs convolutions inside a
    loop body many times slower than outside one (jax-ml/jax#12868).
    """

    def multi_step(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no loop at all for K = 1
            state, metrics = train_step(state, jax.tree.map(lambda x: x[0], batches))
            metrics = jax.tree.map(lambda v: v[None], metrics)
        else:
            state, metrics = jax.lax.scan(train_step, state, batches)
        out = {k: (jnp.sum(v) if k == "skipped" else jnp.mean(v)) for k, v in metrics.items()}
        out["nonfinite_streak"] = state.nonfinite_streak
        return state, out

    return multi_step


# ---- devices and sharding -----------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) named ``data``."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading_axes: int = 1) -> NamedSharding:
    """Split the batch axis on ``data``; ``leading_axes`` = 1 for (K, B, ...) stacked batches."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


#: XLA options trading step speed for compile speed (CPU: ~5x faster compiles, ~1.5x slower steps)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def shard_train_step(multi_step: Callable, mesh: Mesh, fast_compile: bool = False) -> Callable:
    """jit ``multi_step(state, batches)`` with the state replicated and donated and batches
    (K, B, ...) split over ``data``; metrics come back replicated. ``fast_compile`` compiles with
    :data:`FAST_COMPILE` (smoke tests)."""
    rep = replicated(mesh)
    return jax.jit(
        multi_step,
        in_shardings=(rep, batch_sharding(mesh, 1)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
        compiler_options=compiler_options(mesh, fast_compile),
    )


def compiler_options(mesh: Mesh, fast_compile: bool = False) -> dict | None:
    """XLA options of a program on ``mesh``: the faster XLA:CPU convolution path on CPU
    (:func:`~spd_jax.training.compile_cache.cpu_compiler_options`), plus :data:`FAST_COMPILE`."""
    options = compile_cache.cpu_compiler_options(mesh.devices.flat[0].platform)
    if fast_compile:
        options.update(FAST_COMPILE)
    return options or None


def replicate(tree, mesh: Mesh):
    """Place a host-identical pytree replicated on every device of ``mesh`` (multi-process safe)."""
    rep = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), rep, lambda idx: np.asarray(x)[idx]), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Global (K, B, ...) arrays from this process's rows (K, B / process_count, ...)."""
    sharding = batch_sharding(mesh, 1)
    count = jax.process_count()

    def make(x):
        x = np.asarray(x)
        shape = (x.shape[0], x.shape[1] * count) + x.shape[2:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(make, local)
