"""Score maps written tile by tile into a zarr store, resumable: :class:`MapStore`.

The store is a zarr group (a directory) with

- one array, ``probabilities`` or ``logits``, of shape ``(K, H', W')``, chunked
  ``(K, t, t)``: one chunk per tile of ``t x t`` cells, so that tiles never share a chunk;
- the attribute ``cnnserve``: what the map is (format, model fingerprint, classes, geometry,
  image, source, output, dtype, tile size, map shape) and whether it is ``complete``;
- a folder ``done/`` beside the arrays with one small JSON file per finished tile (its
  per-class max and sum of probabilities), written, atomically, only after the tile's chunk
  is: a run killed at any point leaves no tile marked done that was not written whole, and
  a rerun with the same arguments skips exactly the marked tiles.

A store whose ``cnnserve`` attribute describes another map (another model, geometry, image,
output, dtype or tile size) is refused, unless ``overwrite`` (then it is deleted first):
two maps are never mixed. The store must be on a file system every process that writes it
sees (the workers of a cluster too).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._files import atomic_write_bytes

__all__ = ["FORMAT", "MapStore", "MapStoreError"]

FORMAT = "cnnserve-score-map"
VERSION = 1
_DONE = "done"


class MapStoreError(ValueError):
    """A store that cannot take this map: another map, or not a cnnserve map at all."""


def _differences(stored: Mapping, wanted: Mapping) -> list[str]:
    keys = [k for k in wanted if k != "complete"]
    return [k for k in keys if stored.get(k) != wanted[k]]


class MapStore:
    """A zarr map store on disk, opened for writing tiles.

    Parameters
    ----------
    path : str or PathLike
        The store's directory (conventionally ``*.zarr``).
    identity : dict
        JSON-ready description of the map (see the module docstring); two runs write the
        same store only when their identities are equal.
    shape : tuple of int
        ``(K, H', W')``.
    tile : int
        Cells per side of a tile (and of a chunk).
    output : {"probabilities", "logits"}
    dtype : {"float32", "float16"}
    overwrite : bool
        Replace a store that holds another map (a directory that is not a cnnserve map is
        never deleted).

    Attributes
    ----------
    array : zarr.Array
        The map, ``(K, H', W')``.
    grid : tuple of int
        Tiles per column and per row: ``(ceil(H' / t), ceil(W' / t))``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        identity: Mapping[str, Any],
        shape: tuple[int, int, int],
        tile: int,
        output: str,
        dtype: str,
        *,
        overwrite: bool = False,
    ) -> None:
        import zarr

        self.path = Path(path)
        self.output = output
        self.tile = tile
        self.shape = tuple(shape)
        self.grid = (-(-shape[1] // tile), -(-shape[2] // tile))
        self.identity = {"format": FORMAT, "version": VERSION, **identity}
        existing = self._existing()
        if existing is not None:
            diff = _differences(existing, self.identity)
            if diff and not overwrite:
                names = ", ".join(diff)
                hint = (
                    " (the tile size follows --tile-memory unless --tile-cells is given)"
                    if "tile_cells" in diff
                    else ""
                )
                raise MapStoreError(
                    f"{self.path} holds another map (its {names} differ from this run's): "
                    "refusing to mix two maps; give another store, or overwrite it "
                    f"(--overwrite, overwrite=True){hint}"
                )
            if diff:
                shutil.rmtree(self.path)
                existing = None
        if existing is None:
            if self.path.exists() and not self.path.is_dir():
                raise MapStoreError(f"{self.path} is a file, not a zarr store directory")
            group = zarr.open_group(str(self.path), mode="w")
            group.create_array(
                output,
                shape=self.shape,
                chunks=(shape[0], tile, tile),
                dtype=dtype,
                fill_value=np.nan,
            )
            group.attrs["cnnserve"] = {**self.identity, "complete": False}
            (self.path / _DONE).mkdir(exist_ok=True)
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.array = self.group[output]

    def _existing(self) -> dict | None:
        """The stored identity, None for no store (or an empty directory)."""
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            return None
        meta = self.path / "zarr.json"
        try:
            attrs = json.loads(meta.read_text())["attributes"]["cnnserve"]
            if attrs.get("format") != FORMAT:
                raise KeyError("format")
        except (OSError, ValueError, KeyError, TypeError):
            raise MapStoreError(
                f"{self.path} exists and is not a cnnserve map store: give a new path (it is "
                "never deleted, even with --overwrite)"
            ) from None
        return attrs

    # -- tiles ---------------------------------------------------------------------------------

    def tile_cells(self, ti: int, tj: int) -> tuple[int, int, int, int]:
        """``(i0, i1, j0, j1)``: the cells of tile ``(ti, tj)``."""
        t = self.tile
        return (
            ti * t,
            min(self.shape[1], (ti + 1) * t),
            tj * t,
            min(self.shape[2], (tj + 1) * t),
        )

    def tiles(self) -> list[tuple[int, int]]:
        """Every tile, row by row."""
        return [(ti, tj) for ti in range(self.grid[0]) for tj in range(self.grid[1])]

    def _marker(self, ti: int, tj: int) -> Path:
        return self.path / _DONE / f"{ti}_{tj}.json"

    def done(self) -> dict[tuple[int, int], dict]:
        """The finished tiles and their statistics (a marker that does not parse is not done)."""
        out = {}
        folder = self.path / _DONE
        for marker in folder.glob("*.json") if folder.is_dir() else ():
            try:
                ti, tj = (int(v) for v in marker.stem.split("_"))
                stats = json.loads(marker.read_text())
            except (ValueError, OSError):
                continue
            if 0 <= ti < self.grid[0] and 0 <= tj < self.grid[1]:
                out[ti, tj] = stats
        return out

    def write_tile(self, ti: int, tj: int, values: np.ndarray, probabilities: np.ndarray) -> dict:
        """Write tile ``(ti, tj)``'s chunk, then mark it done with its statistics.

        Parameters
        ----------
        values : ndarray, shape (K, i1 - i0, j1 - j0)
            What the store keeps (probabilities or logits).
        probabilities : ndarray, same shape
            For the statistics: per-class max and sum over the tile's cells.
        """
        i0, i1, j0, j1 = self.tile_cells(ti, tj)
        self.array[:, i0:i1, j0:j1] = values
        stats = {
            "max": probabilities.max(axis=(1, 2)).astype(float).tolist(),
            "sum": probabilities.sum(axis=(1, 2), dtype=np.float64).tolist(),
            "cells": int((i1 - i0) * (j1 - j0)),
        }
        self.mark_done(ti, tj, stats)
        return stats

    def mark_done(self, ti: int, tj: int, stats: Mapping[str, Any]) -> None:
        """Mark tile ``(ti, tj)`` done (atomically), once its chunk is written."""
        atomic_write_bytes(self._marker(ti, tj), json.dumps(dict(stats)).encode())

    def finish(self, extra: Mapping[str, Any]) -> None:
        """Mark the map complete, with ``extra`` (aggregates, timings) in its attributes."""
        self.group.attrs["cnnserve"] = {**self.identity, **extra, "complete": True}
