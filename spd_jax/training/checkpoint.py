"""Orbax checkpoints of a training run: state, data-iterator position, spectrum and config.

A checkpoint at step n holds four items:

* ``state``: the :class:`~spd_jax.training.TrainState` (params, EMA, optimiser state, step, rng,
  skip counters), restored directly onto the given shardings;
* ``data``: the grain iterator state (JSON), so the data stream resumes where it stopped;
* ``arrays``: float64 arrays the run depends on (the SPD spectrum);
* ``meta``: JSON (the config, for ``--mode=sample``), plus CRC-32 checksums of the other three
  items taken when the checkpoint was written.

Saving is asynchronous; every process must call :meth:`Checkpointer.save` and
:meth:`Checkpointer.restore` (orbax coordinates the writes). Orbax writes a step into
``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a write cut short by a crash is
never listed (and is replaced when that step is saved again). A listed checkpoint that cannot be
read back, or whose content does not match its checksums (bit rot, truncated or missing files),
raises :class:`CheckpointError`; :meth:`Checkpointer.restore_latest` then falls back to the newest
checkpoint that restores and moves the unreadable ones aside to ``<step>.unreadable`` (nothing
is deleted; the step can then be written again).
"""

from __future__ import annotations

import json
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("state", "data", "arrays", "meta")
#: key of ``meta`` holding the checksums of the other items (removed from what restore returns)
CHECKSUMS = "spd_jax_checksums"
#: suffix given to an unreadable checkpoint directory when a restore falls back past it
SET_ASIDE_SUFFIX = ".unreadable"
#: messages of the reads orbax abandons after a failed restore (printed once per array otherwise)
_ABANDONED_READS = ("Event loop is closed", "Encountered error while reading array index")


class CheckpointError(RuntimeError):
    """A checkpoint's content differs from what was written, or no checkpoint can be restored."""


def _host(x) -> np.ndarray:
    """Host copy of a leaf; a replicated multi-process array is read from its first local shard,
    so every process sees the same bytes. Other non-addressable arrays give an empty array."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                return np.zeros((0,), x.dtype)
            x = x.addressable_data(0)
    return np.asarray(x)


# Kept here: orbax verifies neither array bytes nor JSON items on restore, so bit rot would load silently.
def checksum(tree) -> str:
    """CRC-32 (8 hex digits) of every leaf's dtype, shape and bytes, in tree order."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        host = np.ascontiguousarray(_host(leaf))
        crc = zlib.crc32(f"{host.dtype.str}{host.shape}".encode(), crc)
        crc = zlib.crc32(host.reshape(-1).view(np.uint8), crc)
    return f"{crc:08x}"


def _json_checksum(value) -> str:
    return f"{zlib.crc32(json.dumps(value, sort_keys=True).encode()):08x}"


def _short(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (tensorstore errors carry a 60-line spec)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(" See full TensorStore details", 1)[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(err).__name__}: {text}"


def _quiet_abandoned_reads() -> None:
    """After a failed restore orbax abandons the array reads still in flight, and each prints an
    'Exception ignored' traceback (thousands of lines for one corrupted checkpoint). Install, once
    per process, an unraisable-exception hook that drops those messages and passes on all others."""
    if getattr(sys.unraisablehook, "_spd_jax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if str(unraisable.exc_value).startswith(_ABANDONED_READS):
            return
        previous(unraisable)

    hook._spd_jax_quiet = True
    sys.unraisablehook = hook


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints under ``directory`` (created on first save)."""

    def __init__(self, directory: str | epath.PathLike, max_to_keep: int = 3, asynchronous: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, create=True
        )
        self._manager = ocp.CheckpointManager(epath.Path(directory).absolute(), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, arrays: dict, meta: dict) -> None:
        """Start writing checkpoint ``step`` (returns once the state has been copied off device).

        The checksums of ``state``, ``data_state`` and ``arrays`` are computed here and stored in
        ``meta`` (a host copy of the state: the one extra cost over orbax's own save)."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sums = {"state": checksum(state), "data": _json_checksum(data_state), "arrays": checksum(arrays)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            arrays=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave(dict(meta, **{CHECKSUMS: sums})),
        )
        self._manager.save(int(step), args=args, force=True)

    def _restore(self, step: int, **items):
        _quiet_abandoned_reads()
        return self._manager.restore(int(step), args=ocp.args.Composite(**items))

    def _verify(self, step: int, meta, **values) -> dict:
        """``meta`` without its checksums; raises CheckpointError if a value does not match."""
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {step} under {self.directory}: meta is not a JSON object")
        meta = dict(meta)
        sums = meta.pop(CHECKSUMS, None)
        if sums is None:  # written without checksums: nothing to compare
            return meta
        for name, value in values.items():
            got = _json_checksum(value) if name == "data" else checksum(value)
            if got != sums.get(name):
                raise CheckpointError(
                    f"checkpoint {step} under {self.directory}: the {name!r} item does not match the checksum "
                    f"recorded when it was written ({got} != {sums.get(name)}); its files changed after writing"
                )
        return meta

    def restore(self, step: int, abstract_state):
        """(state, data_state, arrays, meta) of checkpoint ``step``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        :func:`abstract_like`): arrays are restored directly onto them. Raises (orbax's error or
        :class:`CheckpointError`) if the checkpoint cannot be read or fails its checksums.
        """
        out = self._restore(
            step,
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            arrays=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore(),
        )
        arrays = {k: np.asarray(v) for k, v in out.arrays.items()}
        meta = self._verify(step, out.meta, state=out.state, data=out.data, arrays=arrays)
        return out.state, out.data, arrays, meta

    def restore_latest(self, abstract_state):
        """(step, state, data_state, arrays, meta) of the newest checkpoint that restores, or None
        when there is none.

        A newer checkpoint that fails to restore (unreadable, truncated or missing files, checksum
        mismatch) is skipped with a warning naming it and the step used instead, and its directory
        is renamed ``<step>.unreadable`` (nothing is deleted; training can write that step again).
        If no checkpoint restores, :class:`CheckpointError` names them all and nothing is moved.
        """
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = (step,) + self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back
                logging.warning("checkpoint %d under %s cannot be restored (%s)", step, self.directory, _short(err))
                failed.append((step, _short(err)))
                continue
            if failed:
                moved = self._set_aside([s for s, _ in failed])
                logging.warning(
                    "resuming from step %d instead of the newer checkpoint(s) %s, which cannot be restored; "
                    "they were moved (not deleted) to %s",
                    step, [s for s, _ in failed], moved,
                )
            return restored
        if failed:
            reasons = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise CheckpointError(
                f"no checkpoint under {self.directory} can be restored ({reasons}). Nothing was moved or deleted; "
                "move the directory away to start afresh"
            )
        return None

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename checkpoint directories ``<step>`` to ``<step>.unreadable`` (process 0 renames)."""
        targets = []
        root = epath.Path(self.directory)
        for step in steps:
            source = root / str(step)
            target, n = root / f"{step}{SET_ASIDE_SUFFIX}", 1
            while target.exists():
                target, n = root / f"{step}{SET_ASIDE_SUFFIX}.{n}", n + 1
            targets.append((source, target))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("spd_jax_set_aside_start")
        if jax.process_index() == 0:
            for source, target in targets:
                if source.is_dir():
                    source.rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("spd_jax_set_aside_done")
        self._manager.reload()
        return [str(target) for _, target in targets]

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def restore_meta(self, step: int) -> tuple[dict, dict]:
        """(arrays, meta) of checkpoint ``step`` without the training state (checksum-verified)."""
        out = self._restore(step, arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        arrays = {k: np.asarray(v) for k, v in out.arrays.items()}
        return arrays, self._verify(step, out.meta, arrays=arrays)

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree, sharding) -> object:
    """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (one sharding for every leaf)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)
