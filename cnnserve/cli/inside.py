"""``cnnserve activations`` and ``cnnserve filters``: pictures of what happens inside a network
(:mod:`cnnserve.visualise`), from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cnnserve._files import atomic_write_bytes
from cnnserve.cli._common import check_target, int_in_range, positive_int

__all__ = ["add_activations", "add_filters"]

# cnnserve.visualise.TILE_RANGE, repeated so that the CLI starts without importing the
# drawing code (tests/test_visualise_cli.py checks that the two agree).
TILE_RANGE = (4, 512)
tile_size = int_in_range(*TILE_RANGE)


def _cmd_activations(args: argparse.Namespace) -> int:
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.heatmap import png_bytes
    from cnnserve.images import read_image_file
    from cnnserve.visualise import activation_grid, activation_sheet, activations

    # Everything that can be refused is checked before the file is written.
    out = Path(args.out)
    check_target("out", out)
    fcn = load_fully_convolutional(args.model)
    image = read_image_file(args.image, fcn.input_shape[0])
    found = activations(fcn, image)
    pictures = activation_grid(
        found, layers=args.layers, tile=args.tile, class_names=fcn.class_names
    )
    sheet = activation_sheet(pictures)
    data = png_bytes(sheet)
    h, w = image.shape[-2:]
    size = f"{h}x{w} pixels" + (
        f", resized to {fcn.input_shape[1]}x{fcn.input_shape[2]}"
        if (h, w) != fcn.input_shape[1:]
        else ""
    )
    print(f"image {args.image}: {size}")
    for p in pictures:
        a = p.activation
        note = f"zoom {p.zoom}" if a.values.ndim == 3 else "bars"
        print(f"{a.title:<44} min {a.values.min():>9.4g}  max {a.values.max():>9.4g}  ({note})")
    atomic_write_bytes(out, data)
    print(f"wrote {out} ({sheet.width}x{sheet.height}, {len(pictures)} layer(s))")
    return 0


def _cmd_filters(args: argparse.Namespace) -> int:
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.heatmap import png_bytes
    from cnnserve.visualise import filter_grid

    out = Path(args.out)
    check_target("out", out)
    fcn = load_fully_convolutional(args.model)
    grid = filter_grid(fcn, args.layer, tile=args.tile)
    data = png_bytes(grid.picture)
    w = grid.activation.values
    print(f"W{args.layer}: {grid.activation.name} (layer {grid.activation.index}), filters of "
          f"shape {w.shape}, weights from {w.min():.4g} to {w.max():.4g}")  # fmt: skip
    atomic_write_bytes(out, data)
    print(f"wrote {out} ({grid.picture.width}x{grid.picture.height}, zoom {grid.zoom})")
    return 0


def add_activations(commands: Any) -> None:
    """The ``activations`` command."""
    parser = commands.add_parser(
        "activations",
        help="every layer's output for one image, as a picture (the network's activations)",
        description="Run one image through the network (resized to the training size, as "
        "predict does) and draw each layer's output: each channel a tile scaled to its own "
        "min .. max, vector layers and the scores as bars.",
    )
    parser.add_argument("model", help="a trained or converted .safetensors model file")
    parser.add_argument("image", help="an image file (PNG, JPEG, BMP, GIF, TIFF) or a .npy array")
    parser.add_argument("--out", required=True, metavar="ACT.png", help="the picture to write")
    parser.add_argument(
        "--layers",
        help="layers to draw, by index as in `cnnserve info`, and 'input', separated by "
        "commas, e.g. input,0,3 (default: all)",
    )
    parser.add_argument(
        "--tile",
        type=tile_size,
        default=48,
        help=f"a tile's long side in pixels, {TILE_RANGE[0]} to {TILE_RANGE[1]} (default 48)",
    )
    parser.set_defaults(handler=_cmd_activations)


def add_filters(commands: Any) -> None:
    """The ``filters`` command."""
    parser = commands.add_parser(
        "filters",
        help="a conv layer's learned filters, as a picture",
        description="Draw a conv layer's filters, each scaled to its own min .. max: the first "
        "conv layer's as RGB or grey tiles, a later one's one tile per input channel.",
    )
    parser.add_argument("model", help="a trained or converted .safetensors model file")
    parser.add_argument("--out", required=True, metavar="FILTERS.png", help="the picture to write")
    parser.add_argument(
        "--layer",
        type=positive_int,
        default=1,
        help="the conv layer, by the number of its weights W<k> (default 1: the first)",
    )
    parser.add_argument(
        "--tile",
        type=tile_size,
        default=32,
        help=f"a tile's long side in pixels, {TILE_RANGE[0]} to {TILE_RANGE[1]} (default 32)",
    )
    parser.set_defaults(handler=_cmd_filters)
