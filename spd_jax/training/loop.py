"""The training loop: dispatch steps, log, checkpoint, draw sample grids, stop cleanly on SIGTERM.

:func:`fit` knows nothing of configs, models or data sets: it takes a jitted multi-step
function, an iterator of local batches and callables for saving and sampling. Callbacks (a
documented hook a user can pass, e.g. for custom logging or early stopping) are called after
every dispatch with a :class:`StepInfo`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from spd_jax.training.logging import MetricsWriter
from spd_jax.training.state import TrainState, global_batch


class LoopSettings(NamedTuple):
    """How long to train and how often to log, checkpoint and sample (steps; 0 = never)."""

    num_steps: int
    steps_per_dispatch: int = 1
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0  # besides the end of training
    max_nonfinite_streak: int = 20
    batch_size: int = 0  # global batch, for images/s in the log


class StepInfo(NamedTuple):
    """What a callback sees after a dispatch."""

    step: int  # optimiser steps done
    state: TrainState
    metrics: dict  # the last step's metrics (device arrays)
    wait_for_checkpoints: Callable[[], None]  # blocks until every started checkpoint is on disk


Callback = Callable[[StepInfo], Any]


def crossed(before: int, after: int, every: int) -> bool:
    """True if a multiple of ``every`` lies in (before, after]."""
    return every > 0 and after // every > before // every


class _Preemption:
    """Whether to checkpoint and stop after dispatch ``n`` because of a SIGTERM.

    One process: a Python SIGTERM handler records the signal. Several processes: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches SIGTERM on any host
    and agrees on a dispatch at which every process stops, with no host sync of its own per
    dispatch (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`).
    """

    def __init__(self):
        self.requested = False
        self._multihost = jax.process_count() > 1
        self._previous = None if self._multihost else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def stop_after(self, dispatch: int) -> bool:
        """Read once per dispatch (a SIGTERM after this point stops at the next dispatch)."""
        if self._multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(dispatch)
        return self.requested

    def restore(self) -> None:
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._previous)


def fit(
    state: TrainState,
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]],
    batches: Iterator[dict],
    mesh: jax.sharding.Mesh,
    settings: LoopSettings,
    *,
    save: Callable[[int, TrainState], None],
    latest_checkpoint: Callable[[], int | None],
    wait_for_checkpoints: Callable[[], None],
    sample_grid: Callable[[int, TrainState], None] | None = None,
    writer: MetricsWriter | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> TrainState:
    """Train from ``state`` to ``settings.num_steps``; returns the final state.

    ``step_fn(state, stacked)`` runs ``k`` steps on batches stacked along a new leading axis
    (see :func:`~spd_jax.training.state.scan_steps`); ``batches`` yields each process's local
    batches. A checkpoint is saved (``save(step, state)``) every ``checkpoint_every`` steps, at the
    end and when SIGTERM arrives (every process then stops at the same step). A streak of
    ``max_nonfinite_streak`` skipped updates raises ``FloatingPointError`` naming the step; no
    checkpoint is ever written past such a streak.
    """
    step = int(state.step)
    bar = tqdm(total=settings.num_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    preemption = _Preemption()
    last_log, last_time = step, time.perf_counter()
    stop = False
    dispatch = 0  # dispatches of this call; the same count on every process
    # The non-finite streak of a dispatch is read after the next one is dispatched (by then it is
    # ready, and the device already runs the next step while the host prepares the batch after
    # it), and always before a checkpoint, a log row or a sample grid, which wait for the device
    # anyway; so no checkpoint is written past a streak that should have stopped the run.
    unread: list = []  # [(step, streak array)] of the newest dispatch, not yet checked

    def check_streak() -> None:
        if not unread:
            return
        at, value = unread.pop()
        streak = int(value)
        if streak >= settings.max_nonfinite_streak:
            last = latest_checkpoint()  # skipped updates leave params unchanged: every checkpoint is good
            kept = f"the last good checkpoint, step {last}, is kept" if last is not None else "no checkpoint yet"
            raise FloatingPointError(
                f"{streak} non-finite updates in a row up to step {at} (max_nonfinite_streak = "
                f"{settings.max_nonfinite_streak}): stopping; {kept}"
            )

    try:
        while step < settings.num_steps:
            k = min(settings.steps_per_dispatch, settings.num_steps - step)
            local = [next(batches) for _ in range(k)]
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
            state, metrics = step_fn(state, global_batch(stacked, mesh))
            before, step = step, step + k
            check_streak()  # the previous dispatch's
            unread.append((step, metrics["nonfinite_streak"]))
            if crossed(before, step, settings.log_every) or step == settings.num_steps:
                check_streak()
                values = {name: float(v) for name, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_sec"] = (step - last_log) / (now - last_time)
                values["images_per_sec"] = values["steps_per_sec"] * settings.batch_size
                last_log, last_time = step, now
                if writer:
                    writer.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", steps_per_s=f"{values['steps_per_sec']:.1f}")
            bar.update(k)
            for callback in callbacks:
                callback(StepInfo(step, state, metrics, wait_for_checkpoints))
            stop = preemption.stop_after(dispatch)  # every process stops after the same dispatch
            dispatch += 1
            if crossed(before, step, settings.checkpoint_every) or step == settings.num_steps or stop:
                check_streak()
                save(step, state)
            if sample_grid is not None and crossed(before, step, settings.sample_every) and step < settings.num_steps:
                check_streak()
                sample_grid(step, state)
            if stop:
                logging.warning("SIGTERM: wrote the checkpoint of step %d; stopping (rerun to resume)", step)
                break
        if step == settings.num_steps and not stop and sample_grid is not None:
            sample_grid(step, state)
    finally:
        preemption.restore()
        bar.close()
    return state
