"""Gigapixel score maps: a lazily read image to a chunked zarr map, in one process or on Dask.

:func:`score_map_to_zarr` cuts the map into tiles of ``t x t`` cells, one zarr chunk each.
A tile reads from its source only the pixels its cells' windows cover, plus the exact halo a
network with zero padding inside needs (the cells whose receptive fields its own cells'
reach), maps them with :func:`cnnserve.dense.score_map` and keeps its own cells: the same
cells from the same pixels as the in-memory map of the whole image, with no blending, so the
two are equal to float rounding. Memory is set by ``tile_memory``, not by the image.

Each finished tile is marked done in the store after its chunk is written
(:class:`~cnnserve.large.sinks.MapStore`); a rerun with the same arguments skips the tiles
marked done. With a ``dask.distributed`` client, every task computes a block of tiles on a
worker, which loads the model once from its file (the task carries its path, never the
network) and opens the source itself, and writes its own chunks: no two tasks write one chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._checks import check_int
from cnnserve.convert import FullyConvNet, as_fully_convolutional, load_fully_convolutional
from cnnserve.dense import DEFAULT_TILE_MEMORY, score_map
from cnnserve.geometry import Geometry
from cnnserve.large.sinks import MapStore
from cnnserve.large.sources import Source, SourceSpec, open_source

__all__ = [
    "OUTPUTS",
    "LargeMap",
    "compute_tile",
    "connect",
    "local_cluster",
    "model_fingerprint",
    "score_map_to_zarr",
    "tile_halo",
]

OUTPUTS = ("probabilities", "logits")
DTYPES = ("float32", "float16")
MAX_TILE_CELLS = 512  # cells per side of a tile: chunks of at most K * 1 MiB values
_TASKS_PER_WORKER = 4  # blocks of tiles per worker, so that a slow block does not hold the end


def tile_halo(g: Geometry) -> tuple[int, int, int, int]:
    """Cells of context a tile computes before and after its own, per axis (0 without padding).

    Cell i's receptive field is ``[S*i - P, S*i - P + R)``: a tile that computes the cells
    from ``i0 - before`` to ``i1 + after`` holds its own cells' receptive fields whole (as
    :mod:`cnnserve.dense` tiles do).

    Returns
    -------
    tuple of int
        ``(rows before, rows after, columns before, columns after)``.
    """
    s = g.stride
    before = [-(-g.offset[a] // s) for a in (0, 1)]
    after = [-(-max(0, g.receptive_field[a] - g.window[a] - g.offset[a]) // s) for a in (0, 1)]
    return before[0], after[0], before[1], after[1]


def model_fingerprint(fcn: FullyConvNet) -> str:
    """SHA-256 of what the network computes: architecture, normalisation, classes, weights."""
    h = hashlib.sha256()
    head = [fcn.config, fcn.normalization, list(fcn.class_names)]
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in sorted(fcn.params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(fcn.params[name]).tobytes())
    return h.hexdigest()


def _tile_bytes(fcn: FullyConvNet, t: int, halo: int) -> int:
    """Memory of one tile beside the network's activations: its pixels and its scores."""
    g = fcn.geometry
    side = max(g.window) + g.stride * (t + 2 * halo - 1)
    pixels = fcn.input_shape[0] * side * side * 4 * 4  # read, [0, 1], normalised, a copy
    cells = fcn.num_classes * (t + 2 * halo) ** 2 * 4 * 5  # logits, probabilities, outputs
    return pixels + cells


def plan_tile(fcn: FullyConvNet, tile_memory: int) -> int:
    """The largest tile side (cells, at most :data:`MAX_TILE_CELLS`) whose pixels and scores
    take at most half of ``tile_memory`` (the network's activations get the other half)."""
    halo = max(tile_halo(fcn.geometry))
    t = MAX_TILE_CELLS
    while t > 1 and _tile_bytes(fcn, t, halo) > tile_memory // 2:
        t = max(1, t * 3 // 4)
    return t


def compute_tile(
    fcn: FullyConvNet,
    source: Source,
    cells: tuple[int, int, int, int],
    map_shape: tuple[int, int],
    tile_memory: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The logits and probabilities of cells ``[i0, i1) x [j0, j1)`` of an image's map.

    Reads the pixels of the cells' windows and of the halo cells' (:func:`tile_halo`),
    within the image, and maps them with :func:`cnnserve.dense.score_map`.

    Returns
    -------
    logits, probabilities : ndarray, shape (K, i1 - i0, j1 - j0)
    """
    i0, i1, j0, j1 = cells
    rows, cols = map_shape
    g = fcn.geometry
    S, (th, tw) = g.stride, g.window
    hb, ha, wb, wa = tile_halo(g)
    a, b = max(0, i0 - hb), min(rows, i1 + ha)
    c, d = max(0, j0 - wb), min(cols, j1 + wa)
    pixels = source.read(S * a, S * a + th + S * (b - a - 1), S * c, S * c + tw + S * (d - c - 1))
    m = score_map(fcn, pixels, tile_memory=max(1, tile_memory // 2))
    keep = (slice(None), slice(i0 - a, i1 - a), slice(j0 - c, j1 - c))
    return m.logits[keep], m.probabilities[keep]


@dataclass(frozen=True)
class LargeMap:
    """What :func:`score_map_to_zarr` wrote.

    Attributes
    ----------
    path : Path
        The zarr store.
    output : str
        The array's name in the store: ``probabilities`` or ``logits``.
    map_shape : tuple of int
        ``(H', W')``.
    image_size : tuple of int
        ``(H, W)`` of the source (at its level).
    class_names : tuple of str
    geometry : Geometry
    tiles, computed : int
        Tiles of the map, and tiles this call computed (the others were done before).
    seconds : float
    max, mean : ndarray, shape (K,)
        Per class, the largest and the mean probability over the cells.
    """

    path: Path
    output: str
    map_shape: tuple[int, int]
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    geometry: Geometry
    tiles: int
    computed: int
    seconds: float
    max: np.ndarray
    mean: np.ndarray

    def open(self) -> Any:
        """The map as a (lazily read) ``zarr.Array``, shape ``(K, H', W')``."""
        import zarr

        return zarr.open_group(str(self.path), mode="r")[self.output]


# ---------------------------------------------------------------------------------------------
# Workers: the model and the source opened once per process
# ---------------------------------------------------------------------------------------------

_OPEN: dict[tuple, Any] = {}


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _OPEN:
        _OPEN[key] = make()
    return _OPEN[key]


def _worker_model(path: str) -> FullyConvNet:
    stat = os.stat(path)
    key = ("model", path, stat.st_mtime_ns, stat.st_size)
    return _cached(key, lambda: load_fully_convolutional(path))


def run_block(
    model_path: str,
    spec: SourceSpec,
    store_path: str,
    output: str,
    tiles: Sequence[tuple[int, int]],
    tile: int,
    map_shape: tuple[int, int],
    tile_memory: int,
) -> dict:
    """A Dask task: compute ``tiles`` and write their chunks; returns their statistics.

    The model is loaded from ``model_path`` once per worker process; the source and the store
    are opened once per worker too.
    """
    import zarr

    fcn = _worker_model(model_path)
    stat = os.stat(spec.path)  # a file rewritten since is opened anew
    key = ("source", spec, fcn.input_shape[0], stat.st_mtime_ns, stat.st_size)
    source = _cached(key, lambda: spec.open(fcn.input_shape[0]))
    array = zarr.open_array(f"{store_path}/{output}", mode="r+")  # this run's store, as it is
    out = {}
    for ti, tj in tiles:
        cells = _cells(ti, tj, tile, map_shape)
        logits, probabilities = compute_tile(fcn, source, cells, map_shape, tile_memory)
        values = probabilities if output == "probabilities" else logits
        array[:, cells[0] : cells[1], cells[2] : cells[3]] = values
        out[ti, tj] = _stats(probabilities)  # marked done by the client, on its return
    return out


def _cells(ti: int, tj: int, t: int, map_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    return ti * t, min(map_shape[0], (ti + 1) * t), tj * t, min(map_shape[1], (tj + 1) * t)


def _stats(probabilities: np.ndarray) -> dict:
    return {
        "max": probabilities.max(axis=(1, 2)).astype(float).tolist(),
        "sum": probabilities.sum(axis=(1, 2), dtype=np.float64).tolist(),
        "cells": int(probabilities.shape[1] * probabilities.shape[2]),
    }


def connect(address: str, timeout: float = 10.0) -> Any:
    """A ``dask.distributed.Client`` of the scheduler at ``address`` (``tcp://HOST:PORT``).

    Raises
    ------
    ConnectionError
        No scheduler answers there within ``timeout`` seconds.
    """
    from distributed import Client

    if not isinstance(address, str) or "://" not in address:
        raise ValueError(f"scheduler must be an address like tcp://HOST:PORT, got {address!r}")
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"no Dask scheduler answers at {address} within {timeout:g} s: start one "
            "(dask scheduler) or check the address"
        ) from exc


def local_cluster(workers: int) -> Any:
    """A ``dask.distributed.LocalCluster`` of ``workers`` processes, one task at a time each.

    Each process's kernels get an equal share of this machine's cores (``OMP_NUM_THREADS``).
    Its dashboard listens on a free port of 127.0.0.1 (not 8787: two clusters at once, or
    another Dask user, would collide there). The thread settings go to the workers only:
    Dask's default ``pre-spawn-environ`` would also set ``OMP_NUM_THREADS=1`` and others in
    this process's own environment, for the processes it starts later.
    """
    import dask
    from distributed import LocalCluster

    workers = check_int(workers, "workers", 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {
        "OMP_NUM_THREADS": str(max(1, (cores or 1) // workers)),
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_TRIM_THRESHOLD_": "65536",
    }
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            env=env,
        )


# ---------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------


def score_map_to_zarr(
    model: FullyConvNet | str | os.PathLike,
    source: Any,
    store: str | os.PathLike,
    *,
    output: str = "probabilities",
    dtype: str = "float32",
    level: int = 0,
    tile_memory: int = DEFAULT_TILE_MEMORY,
    tile_cells: int | None = None,
    overwrite: bool = False,
    client: Any = None,
    progress: bool | Callable[[int, int], None] = False,
) -> LargeMap:
    """The dense score map of an image of any size, written into a chunked zarr store.

    Parameters
    ----------
    model : FullyConvNet, ConvNet or path
        The network, or its model file (a file is required with ``client``: each worker
        loads it from there once).
    source : path, ndarray or zarr.Array
        The image (:func:`~cnnserve.large.sources.open_source`): a TIFF (tiled or strip,
        BigTIFF, pyramid), a zarr array, a ``.npy`` file, another image file, an array. With
        ``client`` it must be a path that every worker can open.
    store : str or PathLike
        The zarr store's directory (e.g. ``map.zarr``), created if missing; a store holding
        this same map (an earlier, interrupted run) is resumed.
    output : {"probabilities", "logits"}
        The array the store holds, named after it.
    dtype : {"float32", "float16"}
        Its type.
    level : int
        A TIFF pyramid's level (0: full resolution).
    tile_memory : int
        Bytes of working memory per tile: half for its pixels and scores, half for the
        network's activations. It sets the peak memory of a process, not the image.
    tile_cells : int, optional
        Cells per side of a tile and of a chunk (default: the largest that fits
        ``tile_memory``, at most 512).
    overwrite : bool
        Replace a store that holds another map (otherwise refused).
    client : dask.distributed.Client, optional
        Spread the tiles over its workers (blocks of tiles per task).
    progress : bool or callable
        True: a tqdm bar over tiles on stderr, with pixels/s and ETA. A callable is called
        with ``(tiles done, tiles in all)`` after each tile (or block of tiles).

    Returns
    -------
    LargeMap

    Raises
    ------
    ImageError
        The source is not an image (see :func:`~cnnserve.large.sources.open_source`).
    MapStoreError
        The store holds another map, or is not a cnnserve map store.
    ValueError, TypeError
        A bad argument, or an image smaller than the network's window.

    Shape
    -----
    The array is ``(K, H', W')`` with ``H' = (H - Th) // S + 1``, ``W' = (W - Tw) // S + 1``,
    chunked ``(K, t, t)``; cell (i, j) scores ``x in [S*j, S*j + Tw)``, ``y in [S*i, S*i + Th)``.
    """
    started = time.perf_counter()
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tile_memory = check_int(tile_memory, "tile_memory", 1)
    if client is not None and not isinstance(model, str | os.PathLike):
        raise TypeError(
            "model must be a model file path with client: each worker loads it from its file, "
            f"got {type(model).__name__}"
        )
    fcn = as_fully_convolutional(model)
    g = fcn.geometry
    src = open_source(source, fcn.input_shape[0], level=level)
    try:
        if client is not None and src.spec is None:
            raise TypeError("source must be a file path with client: each worker opens it")
        H, W = src.height, src.width
        rows, cols = g.map_size(H, W)
        if tile_cells is None:
            t = plan_tile(fcn, tile_memory)
        else:
            t = check_int(tile_cells, "tile_cells", 1)
        t = min(t, max(rows, cols))
        identity = {
            "model": model_fingerprint(fcn),
            "class_names": list(fcn.class_names),
            "geometry": g.to_dict(),
            "image_size": [H, W],
            "source": src.description if src.spec is None else f"{src.spec.path} {level}",
            "output": output,
            "dtype": dtype,
            "tile_cells": t,
            "map_shape": [rows, cols],
        }
        sink = MapStore(store, identity, (fcn.num_classes, rows, cols), t, output, dtype,
                        overwrite=overwrite)  # fmt: skip
        done = sink.done()
        todo = [tile for tile in sink.tiles() if tile not in done]
        report = _progress(progress, len(sink.tiles()), len(done), g.stride**2)
        try:
            if client is None:
                for ti, tj in todo:
                    cells = sink.tile_cells(ti, tj)
                    logits, probs = compute_tile(fcn, src, cells, (rows, cols), tile_memory)
                    values = probs if output == "probabilities" else logits
                    done[ti, tj] = sink.write_tile(ti, tj, values, probs)
                    report(1, done[ti, tj]["cells"])
            else:
                _run_on(client, sink, model, src.spec, todo, (rows, cols), tile_memory, done,
                        report)  # fmt: skip
        finally:
            report(0, 0, close=True)
    finally:
        src.close()
    cells = sum(s["cells"] for s in done.values())
    high = np.max([s["max"] for s in done.values()], axis=0)
    mean = np.sum([s["sum"] for s in done.values()], axis=0) / cells
    seconds = time.perf_counter() - started
    sink.finish({"max": high.tolist(), "mean": mean.tolist()})
    return LargeMap(
        path=Path(store),
        output=output,
        map_shape=(rows, cols),
        image_size=(H, W),
        class_names=fcn.class_names,
        geometry=g,
        tiles=len(sink.tiles()),
        computed=len(todo),
        seconds=seconds,
        max=high,
        mean=mean,
    )


def _run_on(
    client: Any,
    sink: MapStore,
    model: str | os.PathLike,
    spec: SourceSpec,
    todo: list[tuple[int, int]],
    map_shape: tuple[int, int],
    tile_memory: int,
    done: dict,
    report: Callable[..., None],
) -> None:
    """Blocks of neighbouring tiles as Dask tasks; each finished block's tiles marked done."""
    from distributed import as_completed

    workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    per_task = max(1, min(16, math.ceil(len(todo) / (workers * _TASKS_PER_WORKER))))
    blocks = [todo[k : k + per_task] for k in range(0, len(todo), per_task)]
    model_path = str(Path(model).resolve())
    store = str(sink.path.resolve())
    futures = [
        client.submit(
            run_block,
            model_path,
            spec,
            store,
            sink.output,
            block,
            sink.tile,
            map_shape,
            tile_memory,
            pure=False,
        )  # fmt: skip
        for block in blocks
    ]
    failed = None
    try:
        for future in as_completed(futures, loop=client.loop):
            try:
                stats = future.result()
            except Exception as exc:  # a task that failed on every worker it was tried on
                failed = failed or exc
                continue
            for (ti, tj), s in stats.items():
                sink.mark_done(ti, tj, s)
                done[ti, tj] = s
            report(len(stats), sum(s["cells"] for s in stats.values()))
    finally:
        client.cancel(futures)  # none left on an interruption
    if failed is not None:
        raise RuntimeError(
            f"a block of tiles failed on the cluster ({type(failed).__name__}: {failed}); the "
            "tiles finished are kept: run again with the same arguments to resume"
        ) from failed


def _progress(
    progress: bool | Callable[[int, int], None], total: int, already: int, cell_pixels: int
) -> Callable[..., None]:
    """A reporter ``report(n, cells, close=False)`` for ``n`` more tiles of ``cells`` cells."""
    state = {"done": already, "pixels": 0}
    if callable(progress):

        def call(n: int, cells: int, close: bool = False) -> None:
            if n:
                state["done"] += n
                progress(state["done"], total)

        return call
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    if not progress:
        return lambda n, cells, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=already, unit="tile", desc="score map", leave=False)
    started = time.perf_counter()

    def update(n: int, cells: int, close: bool = False) -> None:
        if n:
            state["done"] += n
            state["pixels"] += cells * cell_pixels
            bar.update(n)
            rate = state["pixels"] / max(1e-9, time.perf_counter() - started)
            bar.set_postfix_str(f"{rate / 1e6:.2f} Mpx/s")  # and redraw
        if close:
            bar.close()

    return update
