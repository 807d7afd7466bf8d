"""Training: the train state and step (:mod:`~spd_jax.training.state`), checkpoints
(:mod:`~spd_jax.training.checkpoint`), the metrics log (:mod:`~spd_jax.training.logging`) and the
loop (:mod:`~spd_jax.training.loop`). Nothing here reads a config."""

from spd_jax.training.state import (
    DATA_AXIS,
    FAST_COMPILE,
    SCHEDULES,
    LossFn,
    TrainState,
    all_finite,
    batch_sharding,
    compiler_options,
    create_train_state,
    ema_decay,
    global_batch,
    learning_rate_schedule,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    replicated,
    scan_steps,
    shard_train_step,
)

__all__ = [
    "DATA_AXIS", "FAST_COMPILE", "SCHEDULES", "LossFn", "TrainState", "all_finite", "batch_sharding", "compiler_options",
    "create_train_state", "ema_decay", "global_batch", "learning_rate_schedule", "make_mesh", "make_optimizer",
    "make_train_step", "replicate", "replicated", "scan_steps", "shard_train_step",
]
