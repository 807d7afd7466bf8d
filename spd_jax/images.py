"""Images on disk: 8-bit conversion and picture grids written as PNG (any ``etils.epath`` path).

A grid shows one or more columns of examples: one column (samples) is tiled into a near-square
grid; several columns (e.g. input | output | reference of a task) become one row of panels per
example, wrapped into near-square groups.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """Model units [-1, 1] -> uint8 [0, 255] (rounded, clipped), as stored in PNG files."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 model units [-1, 1]."""
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def grid(columns: Sequence[np.ndarray] | np.ndarray, *, upscale: int = 1, min_cell: int = 0, pad: int = 1,
         gap: int = 4) -> np.ndarray:
    """A uint8 (rows, cols, C) picture of images (N, H, W, C) in model units.

    ``columns`` is one image array (tiled row by row into a near-square grid) or a list of
    arrays of equal shape shown side by side per example. Images are magnified by nearest
    neighbour ``upscale`` times, or more so that each cell is at least ``min_cell`` pixels high.
    """
    if isinstance(columns, np.ndarray) or not isinstance(columns, Sequence):
        columns = [np.asarray(columns)]
    cols = [to_uint8(c) for c in columns]
    n, h, w, ch = cols[0].shape
    scale = max(int(upscale), math.ceil(min_cell / h) if min_cell else 1, 1)
    if scale > 1:
        cols = [c.repeat(scale, axis=1).repeat(scale, axis=2) for c in cols]
        h, w = h * scale, w * scale
    k = len(cols)
    if k == 1:  # near-square tiling, row-major
        per_row = math.ceil(math.sqrt(n))
        rows, groups, gap = math.ceil(n / per_row), per_row, 0
    else:  # one row of panels per example, wrapped into groups side by side
        groups = max(1, min(n, math.ceil(math.sqrt(n / k))))
        rows = math.ceil(n / groups)
    group_w = k * (w + pad) + pad if k > 1 else w + pad
    width = groups * group_w + (groups - 1) * gap + (pad if k == 1 else 0)
    out = np.full((rows * (h + pad) + pad, width, ch), 255, np.uint8)
    for i in range(n):
        g, r = (i % groups, i // groups) if k == 1 else divmod(i, rows)
        y = pad + r * (h + pad)
        for j, col in enumerate(cols):
            x = g * (group_w + gap) + pad + j * (w + pad)
            out[y : y + h, x : x + w] = col[i]
    return out


def write_png(path: str | epath.PathLike, columns: Sequence[np.ndarray] | np.ndarray, *, upscale: int = 1,
              min_cell: int = 0) -> None:
    """Save :func:`grid` of ``columns`` as one PNG at ``path`` (parent folders are created)."""
    picture = grid(columns, upscale=upscale, min_cell=min_cell)
    buffer = io.BytesIO()
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(buffer, format="PNG")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
