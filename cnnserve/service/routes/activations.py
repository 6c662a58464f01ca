"""``/activations``: what each layer of a network makes of one image, as pictures or numbers.

The image goes through the model's trained network (rebuilt from the converted weights, so
that every layer, even a batchnorm folded into its conv, has its output) at the training
size: an image of another size is resized to it, as ``/predict`` does. ``format=png`` draws the
chosen layers (:func:`cnnserve.visualise.activation_grid`), ``format=json`` gives each layer's
shape and per-channel statistics, and the chosen layers' values, as base64 arrays like
``/scoremap``'s. Requests run on the ``predict`` lane: one training-size input each.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cnnserve.dense import encode_array
from cnnserve.heatmap import png_bytes
from cnnserve.service.deps import (
    ERROR_RESPONSES,
    IMAGE_BODY,
    ModelName,
    ServiceDep,
    decode_image,
    image_bytes,
)
from cnnserve.service.errors import ServiceError
from cnnserve.visualise import activation_grid, activation_sheet, activations, select_layers

__all__ = ["router"]

router = APIRouter(tags=["inside the network"])


@router.post(
    "/v1/models/{name}/activations",
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "`format=json`: each layer's name, shape and per-channel "
            "statistics (and the chosen layers' values). `format=png`: the chosen layers' "
            "grids, one under the other.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
    openapi_extra=IMAGE_BODY,
)
async def layer_activations(
    name: ModelName,
    request: Request,
    service: ServiceDep,
    layer: Annotated[
        str | None,
        Query(
            description="Layers by index, as in the model's `summary` (0 is the first layer), "
            "or `input`; several separated by commas. Default: every layer (json: statistics "
            "only, no values)."
        ),
    ] = None,
    format: Annotated[
        Literal["json", "png"],
        Query(description="`json`: shapes, statistics and values; `png`: the grids."),
    ] = "json",
    tile: Annotated[
        int, Query(ge=4, le=512, description="`png`: a tile's long side, in pixels, about.")
    ] = 48,
) -> Any:
    """Every layer's output for one image: each channel as a tile, or as numbers.

    JSON statistics are per channel of a volume (per unit of a vector): `min`, `max`, `mean`,
    `std` and `zero_fraction`, each a base64 float32 array of shape `(C,)`. With `layer`, the
    layers' values come too, as base64 float32 arrays of their shapes; at most
    `max_json_cells` values in all.
    """
    settings = service.settings
    model = service.model(name)
    fcn = model.fcn
    lane = service.lanes["predict"]
    with lane.admit():
        data = await image_bytes(request, settings.max_body_bytes)

        def work() -> Any:
            started = time.perf_counter()
            pixels = decode_image(data, model, settings.max_pixels)
            found = activations(fcn, pixels)
            try:
                chosen = select_layers(found, layer)
                if format == "png":
                    pictures = activation_grid(
                        chosen, tile=tile, class_names=fcn.class_names, layers=None
                    )
                    return png_bytes(activation_sheet(pictures)), chosen
            except ValueError as exc:
                code = "picture_too_large" if "picture" in str(exc) else "invalid_parameter"
                raise ServiceError(422, code, str(exc)) from None
            values = sum(a.values.size for a in chosen) if layer is not None else 0
            if values > settings.max_json_cells:
                raise ServiceError(
                    422,
                    "map_too_large",
                    f"the chosen layers hold {values:,} values, more than the "
                    f"{settings.max_json_cells:,} a JSON answer carries; choose fewer layers",
                )
            body = {
                "model": model.name,
                "image_size": list(pixels.shape[1:]),
                "resized_to": list(fcn.input_shape[1:])
                if pixels.shape != fcn.input_shape
                else None,
                "layers": [_layer_json(a, a in chosen and layer is not None) for a in found],
                "time_ms": round((time.perf_counter() - started) * 1e3, 3),
            }
            return json.dumps(body, separators=(",", ":")).encode(), chosen

        (body, chosen), seconds = await lane.run(request, model, work)
    if format == "json":
        return Response(body, media_type="application/json")
    return Response(
        body,
        media_type="image/png",
        headers={
            "X-Cnnserve-Layers": ",".join(a.key for a in chosen),
            "X-Cnnserve-Time-Ms": f"{seconds * 1e3:.3f}",
        },
    )


def _layer_json(a: Any, with_values: bool) -> dict:
    """One layer: its key, name, kind, shape, per-channel statistics and maybe its values."""
    d = {
        "layer": a.key,
        "index": a.index,
        "name": a.name,
        "kind": a.kind,
        "shape": list(a.shape),
        "stats": {k: encode_array(v) for k, v in a.channel_stats().items()},
    }
    if with_values:
        d["values"] = encode_array(a.values)
    return d
