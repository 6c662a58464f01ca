"""A downsampled heatmap of a zarr score map: one class, read chunk by chunk.

A map of a gigapixel image has more cells than a picture has pixels: each pixel of the
picture shows the largest probability of the block of ``f x f`` cells it covers (so that a
small object stays visible), with ``f`` the smallest factor that brings the longer side to at
most ``max_side`` pixels. The map is read one chunk at a time: memory is set by the chunks.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from cnnserve._checks import check_int
from cnnserve.dense import softmax_cells
from cnnserve.large.sinks import FORMAT, MapStoreError
from cnnserve.specs import BACKGROUND

__all__ = ["map_picture", "read_map_attributes", "shown_class"]


def read_map_attributes(store: str | os.PathLike) -> tuple[Any, dict]:
    """The zarr group of a cnnserve map store and its ``cnnserve`` attribute.

    Raises
    ------
    MapStoreError
        Not a cnnserve map store.
    """
    import zarr

    try:
        group = zarr.open_group(str(store), mode="r")
        attrs = dict(group.attrs["cnnserve"])
        if attrs.get("format") != FORMAT:
            raise KeyError("format")
    except Exception as exc:  # zarr raises many kinds for what is not a store
        raise MapStoreError(f"{store} is not a cnnserve map store") from exc
    return group, attrs


def shown_class(attrs: dict) -> int:
    """The class a picture shows by default: the top one by max over the cells, other than
    ``background`` (as :func:`cnnserve.dense.default_class`)."""
    names, high = attrs["class_names"], attrs["max"]
    order = sorted(range(len(names)), key=lambda k: -high[k])
    shown = [k for k in order if names[k] != BACKGROUND]
    return (shown or order)[0]


def _block_max(plane: np.ndarray, start: int, f: int, axis: int) -> np.ndarray:
    """Max over the blocks of ``f`` cells (global index // f) along ``axis``."""
    n = plane.shape[axis]
    cuts = np.unique(np.r_[0, np.arange((-start) % f, n, f)])
    return np.maximum.reduceat(plane, cuts, axis=axis)


def map_picture(
    store: str | os.PathLike,
    class_index: int | None = None,
    *,
    max_side: int = 2048,
    legend: bool = True,
) -> tuple[Any, int, int]:
    """The heatmap of one class's probability over a complete zarr map.

    Parameters
    ----------
    store : str or PathLike
        A store written by :func:`~cnnserve.large.run.score_map_to_zarr`.
    class_index : int, optional
        Default: :func:`shown_class`.
    max_side : int
        The picture's longer side is at most this many pixels (before the legend).
    legend : bool
        Add the class label above and the colour bar beside.

    Returns
    -------
    picture : PIL.Image.Image
        RGB.
    class_index : int
    factor : int
        Cells per picture pixel along each axis.

    Shape
    -----
    ``ceil(H' / f) x ceil(W' / f)`` pixels with ``f = ceil(max(H', W') / max_side)``.
    """
    from PIL import Image

    from cnnserve.heatmap import add_legend, colorize

    group, attrs = read_map_attributes(store)
    if not attrs.get("complete"):
        raise MapStoreError(f"{store} holds an unfinished map: run it to the end first")
    names = attrs["class_names"]
    if class_index is None:
        class_index = shown_class(attrs)
    class_index = check_int(class_index, "class_index", 0, len(names) - 1)
    max_side = check_int(max_side, "max_side", 1)
    array = group[attrs["output"]]
    _, rows, cols = array.shape
    f = max(1, math.ceil(max(rows, cols) / max_side))
    preview = np.full((-(-rows // f), -(-cols // f)), -np.inf, dtype=np.float32)
    t = int(attrs["tile_cells"])
    for i0 in range(0, rows, t):
        for j0 in range(0, cols, t):
            block = np.asarray(array[:, i0 : i0 + t, j0 : j0 + t], dtype=np.float32)
            if attrs["output"] == "logits":
                block = softmax_cells(block)
            plane = _block_max(_block_max(block[class_index], i0, f, 0), j0, f, 1)
            bi, bj = i0 // f, j0 // f
            view = preview[bi : bi + plane.shape[0], bj : bj + plane.shape[1]]
            np.maximum(view, plane, out=view)
    picture = Image.fromarray(colorize(preview, vmin=0.0, vmax=1.0))
    if legend:
        picture = add_legend(picture, f"class {names[class_index]!r}: probability")
    return picture, class_index, f
