"""``cnnserve scoremap MODEL BIG.tif --out map.zarr``: the map of a gigapixel image, out of
core, into a zarr store; in one process, or on a Dask cluster (``--scheduler``,
``--local-cluster``)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from cnnserve._files import atomic_write_bytes
from cnnserve.cli._common import EXIT_FAILED, CommandError, check_target, positive_int

__all__ = ["add_large_options", "run_large"]

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
# Options of the in-memory map that a zarr map does not take, with their defaults.
_IN_MEMORY_ONLY = {"json": None, "cells": False, "scales": None, "stride_divisor": 1, "zoom": 1}
# Options of the zarr map, with their defaults: refused without --out.
_ZARR_ONLY = {
    "output": "probabilities",
    "dtype": "float32",
    "level": 0,
    "tile_memory": None,
    "tile_cells": None,
    "overwrite": False,
    "scheduler": None,
    "scheduler_timeout": 10.0,
    "local_cluster": None,
    "png_max_side": 2048,
}


def memory_size(text: str) -> int:
    """An argparse type: bytes, with an optional K, M or G suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text.lower())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"must be a size like 256M or 1G, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def add_large_options(parser: argparse.ArgumentParser) -> None:
    """The zarr-map options of ``scoremap``."""
    group = parser.add_argument_group(
        "gigapixel maps (with --out MAP.zarr; needs the large or dask extra)"
    )
    group.add_argument(
        "--out",
        metavar="MAP.zarr",
        help="write the map into this zarr store, tile by tile, reading the image by region "
        "(tiled or strip TIFF, BigTIFF, pyramids, zarr, .npy): memory is set by --tile-memory, "
        "not by the image; a rerun with the same arguments resumes an interrupted run",
    )
    group.add_argument(
        "--output",
        choices=("probabilities", "logits"),
        default="probabilities",
        help="the array the store holds (default probabilities: per-cell softmax)",
    )
    group.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="its type (default float32; float16 halves the store)",
    )
    group.add_argument("--level", type=int, default=0, help="TIFF pyramid level (default 0)")
    group.add_argument(
        "--tile-memory",
        type=memory_size,
        metavar="SIZE",
        help="working memory per tile, e.g. 256M (default 256M)",
    )
    group.add_argument(
        "--tile-cells",
        type=positive_int,
        metavar="T",
        help="cells per side of a tile and zarr chunk (default: the most --tile-memory fits, "
        "at most 512)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace a store that holds another map"
    )
    group.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="run the tiles on this Dask scheduler"
    )
    group.add_argument(
        "--scheduler-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up on a --scheduler that does not answer within S seconds (default 10)",
    )
    group.add_argument(
        "--local-cluster",
        type=positive_int,
        metavar="N",
        help="run the tiles on a local Dask cluster of N worker processes",
    )
    group.add_argument(
        "--png-max-side",
        type=positive_int,
        default=2048,
        metavar="PX",
        help="with --png: the heatmap's longer side, each pixel the max over its block of "
        "cells (default 2048)",
    )


def run_large(args: argparse.Namespace) -> int | None:
    """Handle ``scoremap`` when it is a zarr map (None: it is not, the caller goes on)."""
    if args.out is None:
        for name, default in _ZARR_ONLY.items():
            if getattr(args, name) != default:
                raise CommandError(f"--{name.replace('_', '-')} needs --out MAP.zarr")
        return None
    out = Path(args.out)
    if out.suffix != ".zarr":
        raise CommandError(f"--out must be a zarr store ending in .zarr, got {out}")
    for name, default in _IN_MEMORY_ONLY.items():
        if getattr(args, name) != default:
            raise CommandError(f"--{name.replace('_', '-')} does not apply to a zarr map (--out)")
    if args.scheduler is not None and args.local_cluster is not None:
        raise CommandError("give --scheduler or --local-cluster, not both")
    if args.png is not None:
        check_target("png", Path(args.png))
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: directory {out.parent} not found")
    try:
        import zarr  # noqa: F401
    except ImportError:
        raise CommandError('--out needs zarr and tifffile: pip install -e ".[large]"') from None
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.dense import DEFAULT_TILE_MEMORY
    from cnnserve.large.picture import map_picture
    from cnnserve.large.run import score_map_to_zarr

    fcn = load_fully_convolutional(args.model)
    class_index = None
    if args.class_ is not None:
        from cnnserve.dense import class_index as find_class

        try:
            class_index = find_class(args.class_, fcn.class_names)
        except ValueError as exc:
            raise CommandError(f"--{exc}") from None
    client, cluster = _client(args)
    try:
        result = score_map_to_zarr(
            args.model,
            args.image,
            out,
            output=args.output,
            dtype=args.dtype,
            level=args.level,
            tile_memory=args.tile_memory or DEFAULT_TILE_MEMORY,
            tile_cells=args.tile_cells,
            overwrite=args.overwrite,
            client=client,
            progress=not args.quiet,
        )
    except RuntimeError as exc:
        print(f"cnnserve scoremap: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    H, W = result.image_size
    rows, cols = result.map_shape
    skipped = result.tiles - result.computed
    rate = H * W * result.computed / result.tiles / max(result.seconds, 1e-9) / 1e6
    print(f"image {args.image}: {H}x{W} pixels; map {rows}x{cols} cells at stride "
          f"{result.geometry.stride} px in {result.tiles} tiles ({result.computed} computed, "
          f"{skipped} already done); {result.seconds:.1f} s, {rate:.2f} Mpx/s")  # fmt: skip
    for name, values in (("mean", result.mean), ("max", result.max)):
        order = sorted(range(len(values)), key=lambda k: -values[k])[: args.top_k]
        top = ", ".join(f"{result.class_names[k]} {values[k]:.3f}" for k in order)
        print(f"top-{len(order)} by {name} over cells: {top}")
    print(f"wrote {out}: array {result.output!r} of shape ({len(result.class_names)}, {rows}, "
          f"{cols}), {args.dtype}")  # fmt: skip
    if args.png is not None:
        picture, shown, factor = map_picture(
            out, class_index, max_side=args.png_max_side, legend=not args.no_legend
        )
        from cnnserve.heatmap import png_bytes

        atomic_write_bytes(Path(args.png), png_bytes(picture))
        print(f"wrote {args.png}: class {fcn.class_names[shown]!r} probability, each pixel the "
              f"max over {factor}x{factor} cells")  # fmt: skip
    return 0


def _client(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Dask client (and local cluster) the options ask for, or (None, None)."""
    if args.scheduler is None and args.local_cluster is None:
        return None, None
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise CommandError(
            '--scheduler and --local-cluster need dask: pip install -e ".[dask]"'
        ) from None
    from cnnserve.large.run import connect, local_cluster

    if args.scheduler is not None:
        try:
            return connect(args.scheduler, timeout=args.scheduler_timeout), None
        except ConnectionError as exc:
            raise CommandError(str(exc)) from None
    started = time.perf_counter()
    cluster = local_cluster(args.local_cluster)
    from distributed import Client

    client = Client(cluster, set_as_default=False)
    if not args.quiet:
        print(f"local Dask cluster of {args.local_cluster} worker processes, started in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)  # fmt: skip
    return client, cluster
