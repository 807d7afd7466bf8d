"""The metrics log of a run: ``metrics.jsonl`` (one JSON row per logged step) and TensorBoard
event files written by tensorboardX (no TensorFlow needed).

A resumed run redoes the steps after its checkpoint: :class:`MetricsWriter` first drops the rows
logged after that step from ``metrics.jsonl`` and opens the event file with tensorboardX's
``purge_step``, so TensorBoard shows each step once.
"""

from __future__ import annotations

import json
import time

from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"


def drop_rows_after(path: str | epath.PathLike, step: int) -> int:
    """Keep only the complete rows of the JSONL file ``path`` with ``"step" <= step`` (a resumed
    run redoes the later ones); rewritten atomically, untouched when nothing is dropped. Returns
    the number of rows dropped (a line cut off by a kill counts as one)."""
    path = epath.Path(path)
    if not path.exists():
        return 0
    blob = path.read_bytes()
    kept, dropped = [], 0
    for line in blob.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    text = b"".join(line + b"\n" for line in kept)
    if dropped or text != blob:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(text)
        tmp.replace(path)
    return dropped


class MetricsWriter:
    """Appends scalars to ``metrics.jsonl`` and to TensorBoard event files under ``workdir``.

    ``start_step`` is the step training (re)starts from: rows and events logged after it by an
    earlier, interrupted run are removed, so every step appears once. Each row carries the Unix
    ``wall_time`` at which it was written; TensorBoard tags are prefixed ``train/``.
    """

    def __init__(self, workdir: str | epath.PathLike, start_step: int = 0):
        from tensorboardX import SummaryWriter

        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / METRICS_FILE
        dropped = drop_rows_after(self._path, start_step)
        if dropped:
            logging.warning("%s: dropped %d row(s) after step %d (redone from the checkpoint)", METRICS_FILE,
                            dropped, start_step)
        self._jsonl = self._path.open("a")
        # purge_step: TensorBoard hides the earlier files' events at steps >= it; the suffix keeps
        # the file of a restart within the same second apart from (and sorted after) the earlier one
        self._events = SummaryWriter(str(workdir), purge_step=start_step + 1 if start_step else None,
                                     filename_suffix=f".from_step_{start_step:010d}")

    def write(self, step: int, scalars: dict) -> None:
        row = {"step": int(step), "wall_time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._events.add_scalar(f"train/{name}", float(value), int(step), walltime=row["wall_time"])
        self._events.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()
