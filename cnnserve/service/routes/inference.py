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

from cnnserve.dense import class_index, default_class, encode_array
from cnnserve.dense import score_map as dense_score_map
from cnnserve.heatmap import MAX_ZOOM, check_picture_size, png_bytes
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
    stride_divisor: Annotated[
        int,
        Query(
            ge=1,
            description="d dividing the model's stride S: cells every S/d pixels "
            "(shift-and-stitch, d*d passes).",
        ),
    ] = 1,
    top_k: TopK = 5,
    format: Annotated[
        Literal["json", "png"], Query(description="`json`: the numbers; `png`: a heatmap.")
    ] = "json",
    class_: Annotated[
        str | None,
        Query(
            alias="class",
            description="A class name or index: the class whose peak is reported (json) "
            "or drawn (png). Default: the top class by max over the cells (the most likely "
            "class anywhere in the image), skipping a class named background.",
        ),
    ] = None,
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
) -> Any:
    """A dense map of class scores: one cell per training-size window of the image.

    The image must be at least the model's window (its training size). Each cell's box is
    in the image's own pixels. An image whose channels are not the model's is converted
    for the network (`converted`; the PNG's `X-Cnnserve-Converted` header) and the
    heatmap is drawn over the image as sent, a colour photo in colour. JSON arrays come as
    base64 of little-endian float32 (int32 for indices and boxes) with their shape.
    """
    settings = service.settings
    model = service.model(name)
    fcn = model.fcn
    try:
        fcn.geometry.finer(stride_divisor)
        chosen = None if class_ is None else class_index(class_, fcn.class_names)
    except ValueError as exc:
        raise ServiceError(422, "invalid_parameter", str(exc)) from None
    lane = service.lanes["scoremap"]
    lane.check_room()
    data = await image_bytes(request, settings.max_body_bytes)
    with lane.admit():

        def work() -> Any:
            started = time.perf_counter()
            pixels = decode_image(data, model, settings.max_pixels)
            _check_map(fcn, pixels.shape[1:], stride_divisor, format, zoom, arrays, settings)
            result = dense_score_map(
                fcn, pixels, stride_divisor=stride_divisor, tile_memory=settings.tile_memory
            )
            index = chosen if chosen is not None else default_class(result)
            if format == "png":
                title = f"class {fcn.class_names[index]!r}: probability" if legend else None
                picture = result.heatmap(pixels, index, alpha=alpha, zoom=zoom, legend=title)
                return result, index, png_bytes(picture)
            # Encoded here, on the inference thread: a large map's JSON takes a while, and
            # on the event loop it would hold up every other request.
            body = {"model": model.name, **_map_json(result, index, top_k, arrays)}
            body["time_ms"] = round((time.perf_counter() - started) * 1e3, 3)
            return result, index, json.dumps(body, separators=(",", ":")).encode()

        (result, index, body), seconds = await lane.run(request, model, work)
    H, W = result.image_size
    service.metrics.pixels.labels(model.name, "scoremap").inc(H * W)
    if format == "json":
        return Response(body, media_type="application/json")
    label = fcn.class_names[index]
    headers = {
        "X-Cnnserve-Class": urllib.parse.quote(label, safe=""),
        "X-Cnnserve-Class-Index": str(index),
        "X-Cnnserve-Map-Shape": f"{result.shape[0]}x{result.shape[1]}",
        "X-Cnnserve-Time-Ms": f"{seconds * 1e3:.3f}",
    }
    if result.converted is not None:  # the picture is over the image as sent, in colour
        headers["X-Cnnserve-Converted"] = result.converted
    return Response(body, media_type="image/png", headers=headers)


def _prediction_json(model: str, result: Any, top_k: int, seconds: float) -> dict:
    """The JSON of a prediction (:class:`~cnnserve.service.schemas.PredictResponse`)."""
    return {"model": model, **result.to_dict(top_k), "time_ms": round(seconds * 1e3, 3)}


def _check_map(
    fcn: Any,
    size: tuple[int, int],
    divisor: int,
    format: str,
    zoom: int,
    arrays: bool,
    settings: Settings,
) -> None:
    """Refuse, before any work, a map the service would not return (422)."""
    H, W = size
    th, tw = fcn.geometry.window
    if H < th or W < tw:
        raise ServiceError(
            422,
            "image_too_small",
            f"the image is {H}x{W} pixels, smaller than the model's {th}x{tw} window",
        )
    rows, cols = fcn.geometry.finer(divisor).map_size(H, W)
    cells = rows * cols
    if cells > settings.max_map_cells:
        raise ServiceError(
            422,
            "map_too_large",
            f"a {H}x{W} image at stride_divisor {divisor} makes a {rows}x{cols} map: {cells:,} "
            f"cells, more than the limit of {settings.max_map_cells:,}; send a smaller image or "
            "a smaller stride_divisor",
        )
    if format == "json" and arrays and cells > settings.max_json_cells:
        raise ServiceError(
            422,
            "map_too_large",
            f"a {rows}x{cols} map has {cells:,} cells, more than the {settings.max_json_cells:,} "
            "whose arrays a JSON answer carries; ask for format=png, or arrays=false for the "
            "aggregates only, or send a smaller image",
        )
    if format == "png":
        try:
            check_picture_size(H, W, zoom)
        except ValueError as exc:
            raise ServiceError(422, "invalid_parameter", str(exc)) from None


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
