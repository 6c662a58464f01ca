"""``cnnserve detect``: where a class is in an image, as boxes from its score maps."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from cnnserve._files import atomic_write_bytes
from cnnserve.cli._common import CommandError, check_target, positive_int

__all__ = ["add_detect"]

MAX_SCALE = 64.0  # as score_map


def _scales(text: str) -> list[float]:
    """``--scales 1,0.5`` -> ``[1.0, 0.5]``: each a number in (0, 64]."""
    factors = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not 0 < value <= MAX_SCALE:  # also NaN and inf
            raise CommandError(
                f"--scales must be numbers in (0, {MAX_SCALE:g}] separated by commas, e.g. "
                f"1,0.5; got {text!r}"
            )
        factors.append(value)
    return factors


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _cmd_detect(args: argparse.Namespace) -> int:
    from cnnserve.boxes import draw_boxes
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.dense import class_index, default_class, score_map
    from cnnserve.heatmap import add_legend, check_picture_size, png_bytes
    from cnnserve.images import image_pixels, read_image_file

    # Everything that can be refused is checked before the maps are computed.
    scales = _scales(args.scales)
    if args.png is not None:
        check_target("png", Path(args.png))
    fcn = load_fully_convolutional(args.model)
    chosen = None
    if args.class_ is not None:
        try:
            chosen = class_index(args.class_, fcn.class_names)
        except ValueError as exc:
            raise CommandError(f"--{exc}") from None
    image = image_pixels(read_image_file(args.image))  # its own channels: pictures in colour
    H, W = image.shape[1:]
    if args.png is not None:
        check_picture_size(H, W, args.zoom, name="--zoom")
    try:
        fcn.geometry.finer(args.stride_divisor)
    except ValueError as exc:
        raise CommandError(f"--{exc}".replace("--stride_divisor", "--stride-divisor")) from None
    started = time.perf_counter()
    result = score_map(
        fcn, image, stride_divisor=args.stride_divisor, scales=scales, progress=not args.quiet
    )
    index = chosen if chosen is not None else default_class(result)
    found = result.detections(index, args.threshold, args.nms_iou)
    seconds = time.perf_counter() - started
    label = fcn.class_names[index]

    if args.json:
        record = {
            "model": str(args.model),
            "image": str(args.image),
            "image_size": {"height": H, "width": W},
            "converted": result.converted,
            "class": {"label": label, "index": index},
            "scales": scales,
            "threshold": args.threshold,
            "nms_iou": args.nms_iou,
            "detections": [d.to_dict() for d in found],
            "seconds": round(seconds, 6),
        }
        print(json.dumps(record, indent=2))
    else:
        shown = ",".join(f"{s:g}" for s in scales)
        print(
            f"image {args.image}: {H}x{W} pixels (H x W); class {label!r}; scales {shown}; "
            f"threshold {args.threshold:g}, nms_iou {args.nms_iou:g}; {seconds:.3f} s"
        )
        if result.converted is not None:
            print(f"converted {result.converted} for the model")
        if not found:
            print(f"no detection of {label!r} at or above {args.threshold:g}")
        for rank, d in enumerate(found, 1):
            box = ", ".join(f"{v:.1f}" for v in d.box)
            print(f"{rank:>3}. {d.class_name} {d.score:.3f} at scale {d.scale:g}: "
                  f"box (x0, y0, x1, y1) = ({box})")  # fmt: skip
    if args.png is not None:
        best = max(result.maps, key=lambda m: m.max[index])  # the first on ties
        picture = best.heatmap(image, index, alpha=args.alpha, zoom=args.zoom)
        picture = draw_boxes(picture, found, zoom=args.zoom)
        at = "" if scales == [1.0] else f" (map at scale {best.scale:g})"
        picture = add_legend(picture, f"class {label!r}: probability{at}")
        atomic_write_bytes(Path(args.png), png_bytes(picture))
        note = f"wrote {args.png}: {len(found)} box(es) over the heatmap of {label!r}"
        print(note, file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON
    return 0


def add_detect(commands: Any) -> None:
    """The ``detect`` command."""
    detect = commands.add_parser(
        "detect",
        help="boxes where a class is in an image: peaks of its score maps over several scales",
        description="Map the image at each scale, take the peaks of the class's probability "
        "(local maxima at or above --threshold) as boxes in the image's pixels, and drop the "
        "boxes that overlap a better one (non-maximum suppression over all scales).",
    )
    detect.add_argument("model", help="a trained or converted .safetensors model file")
    detect.add_argument(
        "image", help="an image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a .npy array"
    )
    detect.add_argument(
        "--class",
        dest="class_",
        metavar="C",
        help="the class to detect, by name or index (default: the top one by max over the "
        "cells, other than 'background')",
    )
    detect.add_argument(
        "--scales",
        default="1",
        metavar="S[,S...]",
        help="resize factors separated by commas, one map each, e.g. 1,0.5,0.25 (default: 1)",
    )
    detect.add_argument(
        "--threshold",
        type=_fraction,
        default=0.5,
        metavar="T",
        help="lowest class probability of a detection, in [0, 1] (default 0.5)",
    )
    detect.add_argument(
        "--nms-iou",
        type=_fraction,
        default=0.3,
        metavar="U",
        help="drop a box that overlaps a better one by an IoU above U, in [0, 1] (default 0.3)",
    )
    detect.add_argument(
        "--stride-divisor",
        type=positive_int,
        default=1,
        metavar="D",
        help="maps D times finer (shift-and-stitch; D must divide the stride; default 1)",
    )
    detect.add_argument("--json", action="store_true", help="print the detections as JSON")
    detect.add_argument(
        "--png", metavar="OUT.png", help="write the boxes, labelled, over the class's heatmap"
    )
    detect.add_argument(
        "--alpha",
        type=_fraction,
        default=0.5,
        help="heatmap opacity under the boxes (default 0.5; 0: the image alone)",
    )
    detect.add_argument(
        "--zoom", type=positive_int, default=1, help="enlarge the --png picture (default 1)"
    )
    detect.add_argument("--quiet", action="store_true", help="no progress bar")
    detect.set_defaults(handler=_cmd_detect)
