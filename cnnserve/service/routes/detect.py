"""Detections over HTTP: ``/detect``, and the scales and limits ``/scoremap`` shares with it.

``POST /v1/models/{name}/detect`` maps the image at each of ``scales`` (resized, bilinear),
finds the peaks of a class's probability at or above ``threshold``, and keeps the best of
those whose boxes overlap by an IoU above ``nms_iou`` (:mod:`cnnserve.detect`). Boxes are in
the image's own pixels. Every scale's map counts toward the service's limits (``max_map_cells``
cells and ``max_pixels`` resized pixels in all), checked before any map is computed.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cnnserve.dense import class_index, default_class
from cnnserve.dense import score_map as dense_score_map
from cnnserve.service.deps import (
    ERROR_RESPONSES,
    IMAGE_BODY,
    ModelName,
    ServiceDep,
    decode_image,
    image_bytes,
)
from cnnserve.service.errors import ServiceError
from cnnserve.service.schemas import DetectResponse
from cnnserve.service.settings import Settings

__all__ = [
    "ClassParam",
    "NmsIou",
    "Scales",
    "StrideDivisor",
    "Threshold",
    "check_maps",
    "choose_class",
    "maps_of",
    "parse_scales",
    "router",
    "shown_map",
]

router = APIRouter(tags=["inference"])

MAX_SCALE = 64.0  # as score_map
MAX_SCALES = 16

Scales = Annotated[
    str,
    Query(
        description="Comma-separated factors in (0, 64] to resize the image by, one map each "
        "(e.g. `1,0.5,0.25`); boxes stay in the image's own pixels.",
        examples=["1,0.5"],
    ),
]
Threshold = Annotated[
    float, Query(ge=0, le=1, description="The lowest class probability a detection may have.")
]
NmsIou = Annotated[
    float,
    Query(
        ge=0,
        le=1,
        description="Non-maximum suppression: a detection whose box overlaps a better one's "
        "by an IoU above this (over all scales) is dropped.",
    ),
]
StrideDivisor = Annotated[
    int,
    Query(
        ge=1,
        description="d dividing the model's stride S: cells every S/d pixels "
        "(shift-and-stitch, d*d passes).",
    ),
]
ClassParam = Annotated[
    str | None,
    Query(
        alias="class",
        description="A class name or index. Default: the top class by max over the cells (the "
        "most likely class anywhere in the image), skipping a class named background.",
    ),
]


def parse_scales(text: str) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]``, or a 422 naming ``scales``."""
    parts = [p.strip() for p in text.split(",")]
    factors = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (0 < value <= MAX_SCALE):  # also NaN and inf
            raise ServiceError(
                422,
                "invalid_parameter",
                f"scales must be comma-separated numbers in (0, {MAX_SCALE:g}], e.g. "
                f"scales=1,0.5; got {text[:80]!r} ({part[:20]!r} is not one)",
            )
        factors.append(value)
    if len(factors) > MAX_SCALES:
        raise ServiceError(
            422, "invalid_parameter", f"scales holds {len(factors)} factors, more than {MAX_SCALES}"
        )
    return factors


def scaled_sizes(H: int, W: int, scales: list[float]) -> list[tuple[int, int]]:
    """The image's size at each scale, as :func:`cnnserve.dense.score_map` resizes it."""
    return [(max(1, round(H * s)), max(1, round(W * s))) for s in scales]


def check_maps(
    fcn: Any, size: tuple[int, int], scales: list[float], divisor: int, settings: Settings
) -> list[tuple[int, int]]:
    """Refuse (422), before any work, scales whose maps the service would not compute.

    Every resized image must hold the window; all of them together at most ``max_pixels``
    pixels and ``max_map_cells`` cells. Returns each scale's map shape ``(H', W')``.
    """
    H, W = size
    th, tw = fcn.geometry.window
    if H < th or W < tw:
        raise ServiceError(
            422,
            "image_too_small",
            f"the image is {H}x{W} pixels, smaller than the model's {th}x{tw} window",
        )
    fine = fcn.geometry.finer(divisor)
    shapes, pixels = [], 0
    for s, (hs, ws) in zip(scales, scaled_sizes(H, W, scales), strict=True):
        if hs < th or ws < tw:
            raise ServiceError(
                422,
                "image_too_small",
                f"scale {s:g} resizes the {H}x{W} image to {hs}x{ws}, smaller than the model's "
                f"{th}x{tw} window; use larger scales",
            )
        shapes.append(fine.map_size(hs, ws))
        pixels += hs * ws
    shown = ",".join(f"{s:g}" for s in scales)
    if len(scales) > 1 and pixels > settings.max_pixels:
        raise ServiceError(
            422,
            "map_too_large",
            f"scales {shown} resize the {H}x{W} image to {pixels:,} pixels in all, more than "
            f"the limit of {settings.max_pixels:,}; use fewer or smaller scales",
        )
    cells = [rows * cols for rows, cols in shapes]
    if sum(cells) > settings.max_map_cells:
        maps = " + ".join(f"{rows}x{cols}" for rows, cols in shapes)
        where = "" if scales == [1.0] else f" at scales {shown}"
        raise ServiceError(
            422,
            "map_too_large",
            f"a {H}x{W} image{where} at stride_divisor {divisor} makes "
            f"{'a ' if len(shapes) == 1 else ''}{maps} map{'s' if len(shapes) > 1 else ''}: "
            f"{sum(cells):,} cells, more than the limit of {settings.max_map_cells:,}; send a "
            "smaller image, fewer or smaller scales, or a smaller stride_divisor",
        )
    return shapes


def maps_of(fcn: Any, pixels: Any, scales: list[float], divisor: int, settings: Settings) -> Any:
    """The :class:`~cnnserve.dense.MultiScaleMap` of the image (one map per scale)."""
    try:
        return dense_score_map(
            fcn, pixels, stride_divisor=divisor, scales=scales, tile_memory=settings.tile_memory
        )
    except ValueError as exc:  # checked before: a last guard, never a 500
        raise ServiceError(422, "invalid_parameter", str(exc)) from None


def shown_map(result: Any, index: int) -> Any:
    """The scale's map a picture shows: where the class is most likely (the first on ties),
    which is the best detection's scale."""
    best = max(range(len(result.maps)), key=lambda n: result.maps[n].max[index])
    return result.maps[best]


def choose_class(fcn: Any, class_: str | None) -> int | None:
    try:
        return None if class_ is None else class_index(class_, fcn.class_names)
    except ValueError as exc:
        raise ServiceError(422, "invalid_parameter", str(exc)) from None


@router.post(
    "/v1/models/{name}/detect",
    response_model=DetectResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=IMAGE_BODY,
)
async def detect(
    name: ModelName,
    request: Request,
    service: ServiceDep,
    class_: ClassParam = None,
    scales: Scales = "1",
    threshold: Threshold = 0.5,
    nms_iou: NmsIou = 0.3,
    stride_divisor: StrideDivisor = 1,
) -> Any:
    """Where a class is in the image: boxes of the peaks of its probability, best first.

    Each scale's map gives the cells whose probability of the class is a local maximum at or
    above `threshold`; each such cell's window, mapped back to the image's pixels, is a box.
    Boxes from all scales that overlap a better one by an IoU above `nms_iou` are dropped.
    """
    settings = service.settings
    model = service.model(name)
    fcn = model.fcn
    factors = parse_scales(scales)
    try:
        fcn.geometry.finer(stride_divisor)
    except ValueError as exc:
        raise ServiceError(422, "invalid_parameter", str(exc)) from None
    chosen = choose_class(fcn, class_)
    lane = service.lanes["scoremap"]
    lane.check_room()
    data = await image_bytes(request, settings.max_body_bytes)
    with lane.admit():

        def work() -> Any:
            started = time.perf_counter()
            pixels = decode_image(data, model, settings.max_pixels)
            H, W = pixels.shape[1:]
            check_maps(fcn, (H, W), factors, stride_divisor, settings)
            result = maps_of(fcn, pixels, factors, stride_divisor, settings)
            index = chosen if chosen is not None else default_class(result)
            found = result.detections(index, threshold, nms_iou)
            body = {
                "model": model.name,
                "version": model.version,
                "image": {"height": H, "width": W},
                "converted": result.converted,
                "class": {"label": fcn.class_names[index], "index": index},
                "scales": factors,
                "threshold": threshold,
                "nms_iou": nms_iou,
                "detections": [d.to_dict() for d in found],
                "time_ms": round((time.perf_counter() - started) * 1e3, 3),
            }
            return H * W, json.dumps(body, separators=(",", ":")).encode()

        (pixels, body), _ = await lane.run(request, model, work)
    service.metrics.pixels.labels(model.name, "scoremap").inc(pixels)
    return Response(body, media_type="application/json")
