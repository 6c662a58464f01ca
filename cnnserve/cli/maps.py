"""``cnnserve scoremap``, ``cnnserve predict`` and ``cnnserve demo``: an image's classes and its
dense score map, from the command line."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._files import atomic_write_bytes
from cnnserve.cli._common import (
    CommandError,
    check_target,
    make_directory,
    positive_int,
    size,
)
from cnnserve.cli.large import add_large_options, run_large

__all__ = ["add_demo", "add_predict", "add_scoremap"]


def _class_index(value: str | None, class_names: Sequence[str]) -> int | None:
    """``--class``: a class name, or an index when no class has that name."""
    from cnnserve.dense import class_index

    if value is None:
        return None
    try:
        return class_index(value, class_names)
    except ValueError as exc:
        raise CommandError(f"--{exc}") from None


def _scales(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise CommandError(f"--scales must be numbers separated by commas, got {text!r}") from exc


def _converted(converted: str | None) -> str:
    """``", converted RGB to grey (...)"`` for an image the model took in other channels."""
    return f", converted {converted} for the model" if converted else ""


def _cmd_scoremap(args: argparse.Namespace) -> int:
    from cnnserve._checks import check_number
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.dense import MultiScaleMap, default_class, score_map
    from cnnserve.heatmap import check_picture_size, png_bytes
    from cnnserve.images import image_pixels, read_image_file

    status = run_large(args)  # --out MAP.zarr: the out-of-core map
    if status is not None:
        return status
    # Everything that can be refused is checked before the map is computed, and the files
    # are written only once both are ready: an error leaves no partial output.
    for option in ("json", "png"):
        if getattr(args, option) is not None:
            check_target(option, Path(getattr(args, option)))
    check_number(args.alpha, "--alpha", 0, 1, "[]")
    fcn = load_fully_convolutional(args.model)
    class_index = _class_index(args.class_, fcn.class_names)
    image = image_pixels(read_image_file(args.image))  # its own channels: pictures in colour
    if args.png:
        check_picture_size(image.shape[1], image.shape[2], args.zoom, name="--zoom")
    started = time.perf_counter()
    result = score_map(
        fcn,
        image,
        stride_divisor=args.stride_divisor,
        scales=_scales(args.scales),
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - started
    maps = result.maps if isinstance(result, MultiScaleMap) else (result,)
    if class_index is None:
        class_index = default_class(result)
    label = fcn.class_names[class_index]

    print(f"image {args.image}: {image.shape[1]}x{image.shape[2]} pixels, {image.shape[0]} "
          f"channel(s){_converted(result.converted)}; {seconds:.3f} s")  # fmt: skip
    print(fcn.geometry.describe())
    for m in maps:
        g = m.geometry_dict()
        scale = f"scale {m.scale:g}: " if len(maps) > 1 or m.scale != 1 else ""
        print(
            f"{scale}map {g['map_shape'][0]}x{g['map_shape'][1]} cells at stride "
            f"{g['cell_stride'][0]:g} px; margins not covered: {g['margins'][0]} rows, "
            f"{g['margins'][1]} columns"
        )
    for by in ("mean", "max"):
        top = ", ".join(
            f"{r['label']} {r['probability']:.3f}" for r in result.top_k(args.top_k, by=by)
        )
        print(f"top-{min(args.top_k, fcn.num_classes)} by {by} over cells: {top}")
    best = maps[0]
    peak = best.peak(class_index)
    box = ", ".join(f"{v:g}" for v in peak["box"])
    print(
        f"class {label!r}: highest probability {peak['probability']:.3f} at "
        f"cell ({peak['row']}, {peak['col']}), box (x0, y0, x1, y1) = ({box})"
    )
    outputs = []
    if args.json is not None:
        record = {
            "model": str(args.model),
            "image": str(args.image),
            "image_size": [image.shape[1], image.shape[2]],
            "seconds": seconds,
            **result.to_dict(top_k=args.top_k, cells=args.cells, scores=True),
        }
        outputs.append((args.json, json.dumps(record).encode(), ""))
    if args.png is not None:
        title = None if args.no_legend else f"class {label!r}: probability"
        picture = best.heatmap(image, class_index, alpha=args.alpha, zoom=args.zoom, legend=title)
        note = f": class {label!r} probability over the image"
        outputs.append((args.png, png_bytes(picture), note))
    for target, data, note in outputs:
        atomic_write_bytes(Path(target), data)
        print(f"wrote {target}{note}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.images import read_image_file
    from cnnserve.predict import predict

    fcn = load_fully_convolutional(args.model)
    image = read_image_file(args.image)  # its own channels: predict converts them
    started = time.perf_counter()
    result = predict(fcn, image)
    seconds = time.perf_counter() - started
    ranked = result.top_k(args.top_k)
    if args.json:
        record = {
            "model": str(args.model),
            "image": str(args.image),
            **result.to_dict(args.top_k),
            "time_ms": round(seconds * 1e3, 3),
        }
        print(json.dumps(record, indent=2))
        return 0
    h, w = result.image_size
    resized = (
        f", resized to {result.resized_to[0]}x{result.resized_to[1]}" if result.resized_to else ""
    )
    converted = _converted(result.converted)
    print(f"image {args.image}: {h}x{w} pixels{resized}{converted}; {seconds * 1e3:.1f} ms")
    width = max(len(r["label"]) for r in ranked)
    for rank, r in enumerate(ranked, 1):
        print(f"{rank:>2}. {r['label']:<{width}}  {r['probability']:.4f}  (class {r['index']})")
    return 0


_DEMO_MAX_PIXELS = 2**22  # canvases up to 2048 x 2048


def _cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image, ImageDraw

    from cnnserve.convert import load_fully_convolutional
    from cnnserve.data import BUNDLED, digits_canvas
    from cnnserve.dense import score_map
    from cnnserve.heatmap import add_legend, check_picture_size, montage, png_bytes
    from cnnserve.specs import BACKGROUND

    height, width = args.size
    if height * width > _DEMO_MAX_PIXELS:
        raise CommandError(f"--size {height}x{width} is over {_DEMO_MAX_PIXELS:,} pixels")
    zoom = args.zoom
    check_picture_size(height, width, zoom, name="--zoom")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is not a directory")
    fcn = load_fully_convolutional(args.model)
    digits = tuple(map(str, range(10)))
    if fcn.input_shape != (1, 8, 8) or fcn.class_names not in (digits, (*digits, BACKGROUND)):
        raise CommandError(
            f"the demo places scikit-learn digits: it needs a digits model (input (1, 8, 8), "
            f"classes 0..9, and maybe {BACKGROUND!r}), got input {fcn.input_shape} and classes "
            f"{fcn.class_names}"
        )
    record = fcn.training
    if record.get("dataset") not in BUNDLED or not record.get("test_fraction"):
        raise CommandError(
            "the demo shows digits the model has never seen: it needs a model trained on "
            f"{' or '.join(map(repr, BUNDLED))} with a test split (its training record has "
            f"dataset {record.get('dataset')!r}, test_fraction {record.get('test_fraction')!r})"
        )
    split = {
        "split_seed": int(record.get("seed", 0)),
        "val_fraction": float(record.get("val_fraction", 0.1)),
        "test_fraction": float(record["test_fraction"]),
    }
    canvas, placements = digits_canvas(args.size, args.count, seed=args.seed, **split)
    result = score_map(fcn, canvas, stride_divisor=fcn.geometry.stride)  # stride 1: a cell
    # at every position
    # The canvas at its own size (8-bit gray): an input for `cnnserve scoremap`.
    picture = Image.fromarray(np.rint(canvas[0] * 255).astype(np.uint8), mode="L")
    panels, rows = [], []
    for place in sorted(placements, key=lambda p: p["label"]):
        label, (x0, y0, x1, y1) = place["label"], place["box"]
        probability = result.probabilities[label]
        panel = result.heatmap(canvas, label, alpha=0.7, zoom=zoom)
        draw = ImageDraw.Draw(panel)
        draw.rectangle([x0 * zoom, y0 * zoom, x1 * zoom - 1, y1 * zoom - 1], outline="cyan")
        panels.append(add_legend(panel, f"class '{label}': probability (cyan: the digit)"))
        here = float(probability[y0, x0])  # the cell whose window is exactly the digit
        predicted = int(np.argmax(result.probabilities[:, y0, x0]))
        py, px = np.unravel_index(int(np.argmax(probability)), probability.shape)
        rows.append((label, place["index"], (x0, y0), here, predicted, (int(px), int(py))))
    files = {"canvas.png": png_bytes(picture), "heatmaps.png": png_bytes(montage(panels, 2))}
    make_directory(out)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    map_rows, map_cols = result.shape
    print(f"canvas {height}x{width} with {len(placements)} held-out digits (test split of "
          f"seed {split['split_seed']}); map {map_rows}x{map_cols} at stride 1")  # fmt: skip
    print(f"{'digit':>5} {'sample':>6} {'at (x, y)':>10} {'p(digit) there':>14} "
          f"{'predicted there':>15} {'peak of p(digit) at':>19}")  # fmt: skip
    for label, index, (x, y), here, predicted, (px, py) in rows:
        print(f"{label:>5} {index:>6} {f'({x}, {y})':>10} {here:>14.3f} {predicted:>15} "
              f"{f'({px}, {py})':>19}")  # fmt: skip
    correct = sum(predicted == label for label, _, _, _, predicted, _ in rows)
    placed = sum(abs(px - x) <= 1 and abs(py - y) <= 1 for _, _, (x, y), _, _, (px, py) in rows)
    print(f"{correct}/{len(rows)} digits classified correctly at their own window; "
          f"{placed}/{len(rows)} digits' classes peak within 1 px of the digit")  # fmt: skip
    print(f"wrote {out / 'canvas.png'} ({height}x{width}, an input for scoremap) and "
          f"{out / 'heatmaps.png'} (zoom {zoom})")  # fmt: skip
    return 0


def add_scoremap(commands: Any) -> None:
    """The ``scoremap`` command."""
    scoremap = commands.add_parser(
        "scoremap",
        help="dense class-score map of an image of any size at least the training size",
        description="Slide a model over an image in one pass and report the map of class "
        "scores: one cell per training-size window at the network's stride.",
    )
    scoremap.add_argument("model", help="a trained or converted .safetensors model file")
    scoremap.add_argument(
        "image",
        help="an image file (PNG, JPEG, ...) or a .npy array; with --out MAP.zarr also a "
        "tiled TIFF, BigTIFF or zarr array of any size",
    )
    scoremap.add_argument(
        "--class",
        dest="class_",
        metavar="K",
        help="the class for the heatmap and the report, by name or index (default: the top one "
        "by max over the cells, other than 'background')",
    )
    scoremap.add_argument(
        "--stride-divisor",
        type=positive_int,
        default=1,
        metavar="D",
        help="a map D times finer (shift-and-stitch; D must divide the stride)",
    )
    scoremap.add_argument(
        "--scales", help="resize factors separated by commas, e.g. 1,0.5 (default: 1)"
    )
    scoremap.add_argument("--top-k", type=positive_int, default=5, help="default 5")
    scoremap.add_argument(
        "--json", metavar="OUT.json", help="write the map (scores as base64 float32) as JSON"
    )
    scoremap.add_argument(
        "--cells", action="store_true", help="with --json: also list every cell's box and top-k"
    )
    scoremap.add_argument("--png", metavar="HEAT.png", help="write the class's heatmap picture")
    scoremap.add_argument(
        "--alpha", type=float, default=0.5, help="heatmap opacity over the image (default 0.5)"
    )
    scoremap.add_argument(
        "--zoom", type=positive_int, default=1, help="enlarge the heatmap picture (default 1)"
    )
    scoremap.add_argument(
        "--no-legend",
        action="store_true",
        help="the bare heatmap (the image's size times --zoom), without the class label above "
        "it and the colour bar beside it",
    )
    scoremap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_large_options(scoremap)
    scoremap.set_defaults(handler=_cmd_scoremap)


def add_predict(commands: Any) -> None:
    """The ``predict`` command."""
    predict = commands.add_parser(
        "predict",
        help="the top classes of one image (the service's /predict without a server)",
        description="Classify one image as a whole: an image of another size than the "
        "training size is resized to it first (bilinear).",
    )
    predict.add_argument("model", help="a trained or converted .safetensors model file")
    predict.add_argument(
        "image", help="an image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a .npy array"
    )
    predict.add_argument("--top-k", type=positive_int, default=5, help="default 5")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    predict.set_defaults(handler=_cmd_predict)


def add_demo(commands: Any) -> None:
    """The ``demo`` command."""
    demo = commands.add_parser(
        "demo",
        help="a canvas of held-out digits and each digit's class heatmap (digits models)",
        description="Place held-out test digits on a larger canvas, map it densely and draw, "
        "for each digit, the heatmap of its class with the digit's true box.",
    )
    demo.add_argument("model", help="a digits model file (trained or converted)")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--size", type=size, default=(48, 96), help="canvas HxW (default 48x96)")
    demo.add_argument("--count", type=positive_int, default=6, help="digits (default 6)")
    demo.add_argument("--seed", type=int, default=0, help="layout seed (default 0)")
    demo.add_argument("--zoom", type=positive_int, default=4, help="picture zoom (default 4)")
    demo.set_defaults(handler=_cmd_demo)
