"""Workdir, report and image paths go through etils.epath, so a ``gs://`` workdir reaches the
cloud filesystem instead of becoming a local folder named ``gs:``. A fake bucket maps
``gs://bucket`` onto a temporary folder through epath's own mock backend."""

import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from PIL import Image

from spd_jax import images
from spd_jax.run import checks
from spd_jax.training.logging import drop_rows_after

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """Every epath call on gs://bucket/... acts on tmp_path/...; the current folder is elsewhere, so
    a path that lost its scheme would land in the (empty) current folder instead."""
    root = tmp_path / "bucket"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path) -> str:
        path = os.fspath(path)
        return str(root) + path[len(BUCKET):] if path.startswith(BUCKET) else path

    def redirect(original, path, *args, **kwargs):
        if "dst" in kwargs:
            kwargs["dst"] = local(kwargs["dst"])
        return original(local(path), *[local(a) if isinstance(a, str) else a for a in args], **kwargs)

    fns = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove", "rename", "replace",
           "rmtree", "stat", "copy")
    with epath_testing.mock_epath(**{name: redirect for name in fns}):
        yield root, cwd


def test_a_cloud_workdir_is_kept_as_a_cloud_path(bucket):
    root, cwd = bucket
    path = checks.check_workdir(f"{BUCKET}/run")
    assert str(path) == f"{BUCKET}/run" and not os.listdir(cwd)


def test_grids_and_logs_are_written_into_the_bucket(bucket):
    root, cwd = bucket
    run = epath.Path(f"{BUCKET}/run")
    pictures = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1)
    images.write_png(run / "samples" / "step_0000001.png", pictures)
    with Image.open(root / "run" / "samples" / "step_0000001.png") as png:
        assert png.size == (2 * 9 + 1, 2 * 9 + 1)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert drop_rows_after(run / "metrics.jsonl", 2) == 1
    assert (root / "run" / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert not os.listdir(cwd)  # nothing landed in a local folder named "gs:"
