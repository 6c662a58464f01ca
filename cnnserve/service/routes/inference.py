"""Routes that run a network on an image: ``/predict`` (class scores) and ``/scoremap``.

Each request is admitted to its endpoint's :class:`~cnnserve.service.deps.Lane` once its
body has been read (a full lane refuses it before), then decoded and run on one of the
lane's threads: ``/predict`` classifies the
image as a whole (resized to the training size), ``/scoremap`` returns a dense map of class
scores over every training-size window, as JSON (arrays in base64) or as a heatmap PNG.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cnnserve.boxes import draw_boxes
from cnnserve.dense import default_class, encode_array
from cnnserve.heatmap import MAX_ZOOM, add_legend, check_picture_size, png_bytes
from cnnserve.service.deps import (
    ERROR_RESPONSES,
    IMAGE_BODY,
    ModelName,
    ServiceDep,
    TopK,
    decode_image,
    image_bytes,
)
from cnnserve.service.errors import ServiceError
from cnnserve.service.routes.detect import (
    ClassParam,
    NmsIou,
    Scales,
    StrideDivisor,
    Threshold,
    check_maps,
    choose_class,
    maps_of,
    parse_scales,
    shown_map,
)
from cnnserve.service.schemas import PredictResponse, ScoreMapResponse
from cnnserve.service.settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=IMAGE_BODY,
)
async def predict(name: ModelName, request: Request, service: ServiceDep, top_k: TopK = 5) -> dict:
    """The top-k classes of an image.

    The image is classified as a whole: one of another size than the training size is
    resized to it (bilinear, antialiased when it shrinks) first. An image whose channels
    are not the model's is converted (colour to grey by ITU-R 601 luma, grey to RGB by
    repetition) and `converted` says so. For where in a large image each class is, use
    `/scoremap`.
    """
    settings = service.settings
    model = service.model(name)
    lane = service.lanes["predict"]
    lane.check_room()  # a full lane refuses before reading the body
    data = await image_bytes(request, settings.max_body_bytes)
    # Admitted (a place only once the body is in: stalled uploads hold none), then run in a
    # batch with others when batching is on.
    result, seconds = await service.predict(request, model, data)
    service.metrics.pixels.labels(model.name, "predict").inc(
        result.image_size[0] * result.image_size[1]
    )
    return {**_prediction_json(model.name, result, top_k, seconds), "version": model.version}


@router.post(
    "/v1/models/{name}/scoremap",
    response_model=ScoreMapResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "`format=json`: the score map. `format=png`: the heatmap of "
            "the class over the image.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
    },
    openapi_extra=IMAGE_BODY,
)
async def scoremap(
    name: ModelName,
    request: Request,
    service: ServiceDep,
    stride_divisor: StrideDivisor = 1,
    top_k: TopK = 5,
    format: Annotated[
        Literal["json", "png"], Query(description="`json`: the numbers; `png`: a heatmap.")
    ] = "json",
    class_: ClassParam = None,
    alpha: Annotated[
        float, Query(ge=0, le=1, description="Heatmap opacity over the image (png).")
    ] = 0.5,
    zoom: Annotated[
        int,
        Query(ge=1, le=MAX_ZOOM, description="Draw the heatmap this many times the image's size."),
    ] = 1,
    legend: Annotated[
        bool,
        Query(
            description="`png`: the class label above the heatmap and its colour bar beside "
            "it. false: the bare heatmap, the image's size times `zoom`, to lay over the image."
        ),
    ] = True,
    arrays: Annotated[
        bool,
        Query(
            description="`json`: include the per-cell arrays (logits, probabilities, boxes, "
            "cell_top_k). false: the map's shape, geometry, aggregates and the class's peak "
            "only, for maps with more cells than `max_json_cells`."
        ),
    ] = True,
    scales: Scales = "1",
    detections: Annotated[
        bool,
        Query(
            description="Also the class's detections (boxes of its probability's peaks over "
            "all scales, as `/detect` gives them): in the JSON, and drawn with labels on the PNG."
        ),
    ] = False,
    threshold: Threshold = 0.5,
    nms_iou: NmsIou = 0.3,
) -> Any:
    """A dense map of class scores: one cell per training-size window of the image.

    The image must be at least the model's window (its training size). Each cell's box is
    in the image's own pixels. An image whose channels are not the model's is converted
    for the network (`converted`; the PNG's `X-Cnnserve-Converted` header) and the
    heatmap is drawn over the image as sent, a colour photo in colour. JSON arrays come as
    base64 of little-endian float32 (int32 for indices and boxes) with their shape. With
    several `scales`, the map shown (the JSON's map fields, the PNG) is the scale where the
    class is most likely (`scale`, header `X-Cnnserve-Scale`); the aggregates cover every scale.
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
            shapes = check_maps(fcn, pixels.shape[1:], factors, stride_divisor, settings)
            if format == "png":
                _check_picture(pixels.shape[1:], zoom)
            elif arrays:
                _check_json_cells(shapes, settings)
            multi = maps_of(fcn, pixels, factors, stride_divisor, settings)
            index = chosen if chosen is not None else default_class(multi)
            result = shown_map(multi, index)
            found = multi.detections(index, threshold, nms_iou) if detections else None
            if format == "png":
                picture = result.heatmap(pixels, index, alpha=alpha, zoom=zoom)
                if found is not None:
                    picture = draw_boxes(picture, found, zoom=zoom)
                if legend:
                    at = "" if factors == [1.0] else f" (map at scale {result.scale:g})"
                    title = f"class {fcn.class_names[index]!r}: probability{at}"
                    picture = add_legend(picture, title)
                return result, index, found, png_bytes(picture)
            # Encoded here, on the inference thread: a large map's JSON takes a while, and
            # on the event loop it would hold up every other request.
            body = {"model": model.name, **_map_json(result, index, top_k, arrays)}
            body.update(aggregate=multi.aggregate_dict(top_k), scale=result.scale, scales=factors)
            if found is not None:
                body.update(threshold=threshold, nms_iou=nms_iou)
                body["detections"] = [d.to_dict() for d in found]
            body["time_ms"] = round((time.perf_counter() - started) * 1e3, 3)
            return result, index, found, json.dumps(body, separators=(",", ":")).encode()

        (result, index, found, body), seconds = await lane.run(request, model, work)
    H, W = result.image_size
    service.metrics.pixels.labels(model.name, "scoremap").inc(H * W)
    if format == "json":
        return Response(body, media_type="application/json")
    label = fcn.class_names[index]
    headers = {
        "X-Cnnserve-Class": urllib.parse.quote(label, safe=""),
        "X-Cnnserve-Class-Index": str(index),
        "X-Cnnserve-Map-Shape": f"{result.shape[0]}x{result.shape[1]}",
        "X-Cnnserve-Scale": f"{result.scale:g}",
        **({} if found is None else {"X-Cnnserve-Detections": str(len(found))}),
        "X-Cnnserve-Time-Ms": f"{seconds * 1e3:.3f}",
    }
    if result.converted is not None:  # the picture is over the image as sent, in colour
        headers["X-Cnnserve-Converted"] = result.converted
    return Response(body, media_type="image/png", headers=headers)


def _prediction_json(model: str, result: Any, top_k: int, seconds: float) -> dict:
    """The JSON of a prediction (:class:`~cnnserve.service.schemas.PredictResponse`)."""
    return {"model": model, **result.to_dict(top_k), "time_ms": round(seconds * 1e3, 3)}


def _check_picture(size: tuple[int, int], zoom: int) -> None:
    """Refuse, before any work, a picture the service would not draw (422)."""
    try:
        check_picture_size(size[0], size[1], zoom)
    except ValueError as exc:
        raise ServiceError(422, "invalid_parameter", str(exc)) from None


def _check_json_cells(shapes: list[tuple[int, int]], settings: Settings) -> None:
    """Refuse (422) JSON arrays of a map of more than ``max_json_cells`` cells."""
    rows, cols = max(shapes, key=lambda shape: shape[0] * shape[1])
    cells = rows * cols
    if cells > settings.max_json_cells:
        raise ServiceError(
            422,
            "map_too_large",
            f"a {rows}x{cols} map has {cells:,} cells, more than the {settings.max_json_cells:,} "
            "whose arrays a JSON answer carries; ask for format=png, or arrays=false for the "
            "aggregates only, or send a smaller image",
        )


def _map_json(result: Any, index: int, top_k: int, arrays: bool) -> dict:
    """The JSON of a score map: arrays compact (base64), nothing per cell as objects."""
    d = result.to_dict(top_k=top_k, cells=False, scores=arrays)
    d["class"] = {
        "label": result.class_names[index],
        "index": index,
        "peak": result.peak(index),
    }
    if arrays:
        indices, probabilities = result.cell_top_k(top_k)
        d["boxes"] = encode_array(result.boxes(), "int32")
        d["cell_top_k"] = {
            "indices": encode_array(indices, "int32"),
            "probabilities": encode_array(probabilities),
        }
    return d
