"""Orbax checkpoints of a training run: state, data-iterator position, spectrum and config.

A checkpoint at step n holds four items:

* ``state``: the :class:`~spd_jax.train.TrainState` (params, EMA, optimiser state, step, rng,
  skip counters), restored directly onto the given shardings;
* ``data``: the grain iterator state (JSON), so the data stream resumes where it stopped;
* ``arrays``: float64 arrays the run depends on (the SPD spectrum);
* ``meta``: JSON (the config, for ``--mode=sample``).

Saving is asynchronous; every process must call :meth:`Checkpointer.save` and
:meth:`Checkpointer.restore` (orbax coordinates the writes).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "data", "arrays", "meta")


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints under ``directory`` (created on first save)."""

    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, create=True
        )
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, arrays: dict, meta: dict) -> None:
        """Start writing checkpoint ``step`` (returns once the state has been copied off device)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            arrays=ocp.args.StandardSave({k: np.asarray(v) for k, v in arrays.items()}),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(int(step), args=args, force=True)

    def restore(self, step: int, abstract_state):
        """(state, data_state, arrays, meta) of checkpoint ``step``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`abstract_like`): arrays are restored directly onto them.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            arrays=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(int(step), args=args)
        arrays = {k: np.asarray(v) for k, v in out.arrays.items()}
        return out.state, out.data, arrays, out.meta

    def restore_latest(self, abstract_state):
        """(step, state, data_state, arrays, meta) of the newest checkpoint that restores, or None
        when there is none. A checkpoint that fails to restore (corrupted, half-written) is
        skipped with a warning naming it and the one used instead; nothing is deleted."""
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = (step,) + self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back
                logging.warning("checkpoint %d under %s cannot be restored (%s: %s)", step, self.directory,
                                type(err).__name__, err)
                failed.append(step)
                continue
            if failed:
                logging.warning("checkpoint(s) %s could not be restored; resuming from step %d instead "
                                "(the unreadable ones are left in place)", failed, step)
            return restored
        if failed:
            raise RuntimeError(f"no checkpoint under {self.directory} can be restored (tried steps {failed})")
        return None

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def restore_meta(self, step: int) -> tuple[dict, dict]:
        """(arrays, meta) of checkpoint ``step`` without the training state."""
        args = ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        out = self._manager.restore(int(step), args=args)
        return {k: np.asarray(v) for k, v in out.arrays.items()}, out.meta

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree, sharding) -> object:
    """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (one sharding for every leaf)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)
