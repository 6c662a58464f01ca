"""The Open Inference Protocol (KServe "V2"), REST: what Triton, KServe and Seldon clients speak.

``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{version}]`` (model metadata) and ``.../ready``, and
``POST /v2/models/{name}[/versions/{version}]/infer`` with JSON tensors or the binary tensor
extension (``Inference-Header-Content-Length``: the JSON header, then the raw tensors in
order). Errors take the protocol's form, ``{"error": "..."}``.

The one input is ``image``, in either of two forms (the model metadata says so too):

- ``UINT8`` of shape ``(N, H, W, C)``: pixels as an image file holds them; the service scales
  and normalises them as ``/predict`` does.
- ``FP32`` of shape ``(N, C, H, W)``: the network's input, already preprocessed (scaled to
  [0, 1] and normalised with the model's ``normalization``), at the training size.

An input of the training size gives ``scores`` (logits) and ``probabilities``, ``(N, K)``,
run through the model's dynamic batcher as ``/predict`` is. A larger ``UINT8`` input gives
the dense maps ``score_map`` and ``probability_map``, ``(N, K, H', W')``, one cell per
training-size window (as ``/scoremap``). Outputs come as JSON ``data`` unless the request asks
for binary data (``"binary_data": true`` on an output, or ``"binary_data_output": true``).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from cnnserve import __version__
from cnnserve.dense import score_map as dense_score_map
from cnnserve.images import as_image
from cnnserve.service.deps import ModelName, ServiceDep, read_body
from cnnserve.service.errors import ServiceError
from cnnserve.service.registry import LoadedModel

__all__ = ["HEADER_LENGTH", "parse_request", "router"]


class V2Error(BaseModel):
    """An error of the Open Inference Protocol."""

    error: str = Field(description="What went wrong, for people.")


def _errors(*statuses: int) -> dict:
    text = {
        400: "A bad inference request (JSON, tensor, shape, datatype, outputs).",
        404: "No model of that name, or no such version of it.",
        413: "The body is larger than the byte limit, or the tensor than the pixel limit.",
        422: "A bad path parameter.",
        503: "Not ready: models are loading or failed, or every slot stayed busy.",
    }
    return {s: {"model": V2Error, "description": text[s]} for s in statuses}


router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=_errors(404, 422, 503))

INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": 'An inference request: JSON `{"inputs": [{"name": "image", '
        '"datatype": "UINT8", "shape": [N, H, W, C], "data": [...]}]}`, or that '
        "JSON followed by the raw tensor bytes, its length in the "
        "Inference-Header-Content-Length header (binary tensor extension).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# The binary tensor extension's header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"

_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
_CLASS_OUTPUTS = ("scores", "probabilities")
_MAP_OUTPUTS = ("score_map", "probability_map")

Version = Annotated[str, Path(description="A model version, as listed by its metadata.")]


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def _model(service: Any, name: str, version: str | None) -> LoadedModel:
    model = service.model(name)
    if version is not None and version != model.version:
        raise ServiceError(
            404,
            "version_not_found",
            f"model {name!r} has no version {version!r}; served: {model.version}",
        )
    return model


# ---------------------------------------------------------------------------------------------
# Server and model metadata, health
# ---------------------------------------------------------------------------------------------


@router.get("")
async def server_metadata() -> dict:
    """The server's name, version and protocol extensions."""
    return {"name": "cnnserve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict:
    """The process is alive (it may still be loading models)."""
    return {"live": True}


@router.get("/health/ready")
async def ready(service: ServiceDep) -> dict:
    """Ready as ``/readyz`` is: every model loaded (503 with the reason otherwise)."""
    service.check_ready()
    return {"ready": True}


def _metadata(model: LoadedModel) -> dict:
    C, th, tw = model.fcn.input_shape
    K = model.fcn.num_classes
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "cnnserve",
        "inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, C]},
            {"name": "image", "datatype": "FP32", "shape": [-1, C, th, tw]},
        ],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, K]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, K]},
            {"name": "score_map", "datatype": "FP32", "shape": [-1, K, -1, -1]},
            {"name": "probability_map", "datatype": "FP32", "shape": [-1, K, -1, -1]},
        ],
        "parameters": {
            "image_layout": {
                "UINT8": f"(N, H, W, {C}) pixels 0-255, H >= {th} and W >= {tw}; scaled and "
                "normalised by the service",
                "FP32": f"(N, {C}, {th}, {tw}) the network's input, already preprocessed: "
                "pixels / 255, then (x - mean) / std per channel with `normalization`",
            },
            "outputs": "an input of the training size gives scores (logits) and "
            "probabilities, (N, K); a larger UINT8 input gives score_map and "
            "probability_map, (N, K, H', W'), one cell per training-size window",
            "classes": list(model.fcn.class_names),
            "normalization": model.fcn.normalization,
            "window": [th, tw],
            "stride": model.fcn.geometry.stride,
        },
    }


@router.get("/models/{name}")
async def model_metadata(name: ModelName, service: ServiceDep) -> dict:
    """The model's inputs and outputs (names, datatypes, shapes) and versions."""
    return _metadata(_model(service, name, None))


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: ModelName, version: Version, service: ServiceDep) -> dict:
    """The metadata of one version of a model."""
    return _metadata(_model(service, name, version))


@router.get("/models/{name}/ready")
async def model_ready(name: ModelName, service: ServiceDep) -> dict:
    """The model is loaded and serves (404 for a name that is not served)."""
    model = _model(service, name, None)
    return {"name": model.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: ModelName, version: Version, service: ServiceDep) -> dict:
    """One version of the model is loaded and serves."""
    model = _model(service, name, version)
    return {"name": model.name, "ready": True}


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of an inference request and its binary part (maybe empty)."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()):
            raise _bad(f"{HEADER_LENGTH} {header_length!r} is not a number")
        if len(header_length) > 18:  # more bytes than any body (and int() refuses 4300 digits)
            raise _bad(f"{HEADER_LENGTH} is {len(header_length)} digits long: too large")
        n = int(header_length)
        if n > len(body):
            raise _bad(f"{HEADER_LENGTH} is {n}, more than the body's {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the inference request is not JSON: {exc}") from None
    except RecursionError:
        raise _bad("the inference request is JSON nested too deep") from None
    except ValueError as exc:  # an integer literal of more digits than Python converts
        raise _bad(f"the inference request holds a number it cannot read: {exc}") from None
    if not isinstance(request, dict):
        raise _bad("the inference request must be a JSON object")
    return request, binary


def _tensor(spec: Any, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor of a request, and the offset of the next binary tensor."""
    if not isinstance(spec, dict):
        raise _bad("each input must be an object with name, shape, datatype and data")
    name = spec.get("name")
    if name != "image":
        raise _bad(f"unknown input {name!r}: the one input is 'image'")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in _DTYPES:
        raise _bad(f"input 'image' has datatype {datatype!r}; expected UINT8 or FP32")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise _bad(f"input 'image' must have a shape of 4 positive ints, got {shape!r}")
    dtype = _DTYPES[datatype]
    count = math.prod(shape)  # exact: a huge shape is refused below, not wrapped
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("an input's parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"binary_data_size must be a non-negative int, got {size!r}")
        if size != count * dtype.itemsize:
            raise _bad(
                f"input 'image' of shape {shape} and datatype {datatype} needs "
                f"{count * dtype.itemsize} bytes, but binary_data_size is {size}"
            )
        if offset + size > len(binary):
            raise _bad("the binary part of the body is shorter than binary_data_size")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array, offset + size
    if "data" not in spec:
        raise _bad("input 'image' has neither data nor parameters.binary_data_size")
    try:
        values = np.asarray(spec["data"])
    except (ValueError, TypeError):
        raise _bad("input 'image': data must be a (nested) list of numbers") from None
    if values.dtype.kind not in "iuf" or values.size != count:
        raise _bad(
            f"input 'image': data must be {count} numbers for shape {shape}, got "
            f"{values.size} value(s) of kind {values.dtype.name}"
        )
    if datatype == "UINT8":
        if values.dtype.kind == "f" and not np.all(values == np.round(values)):
            raise _bad("input 'image' (UINT8): data must be integers")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise _bad("input 'image' (UINT8): data must be in 0-255")
    return values.astype(dtype).reshape(shape), offset


def _parse(body: bytes, header_length: str | None) -> tuple[dict, np.ndarray]:
    """The JSON part of an inference request and its one input tensor ``image``."""
    inference, binary = parse_request(body, header_length)
    inputs = inference.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise _bad("inputs must be a list of one tensor named 'image'")
    image, used = _tensor(inputs[0], binary, 0)
    if used != len(binary):
        raise _bad(f"the body has {len(binary) - used} byte(s) after the last binary tensor")
    return inference, image


def _outputs(request: dict, available: tuple[str, ...]) -> list[tuple[str, bool]]:
    """The outputs asked for, each with whether it goes as binary data."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("the request's parameters must be an object")
    binary_default = parameters.get("binary_data_output") is True
    asked = request.get("outputs")
    if asked is None:
        return [(name, binary_default) for name in available]
    if not isinstance(asked, list) or not asked:
        raise _bad("outputs must be a non-empty list of objects with a name")
    chosen = []
    for spec in asked:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in available:
            raise _bad(
                f"output {name!r} is not available for this input; available: "
                f"{', '.join(available)}"
            )
        params = spec.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else False
        chosen.append((name, binary is True))
    return chosen


def _softmax(scores: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _classify_inputs(model: LoadedModel, image: np.ndarray) -> np.ndarray:
    """The network inputs ``(N, C, Th, Tw)`` of a training-size ``image`` tensor."""
    fcn = model.fcn
    if image.dtype == np.uint8:  # (N, H, W, C) pixels
        pixels = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
        return fcn.preprocess(np.stack([as_image(p, fcn.input_shape[0]) for p in pixels]))
    if not np.all(np.isfinite(image)):
        raise _bad("input 'image' (FP32) holds NaN or infinity")
    return image.astype(fcn.dtype, copy=False)


@router.post(
    "/models/{name}/infer",
    responses={**_errors(400, 413), 200: {"description": "The inference response."}},
    openapi_extra=INFER_BODY,
)
async def infer(name: ModelName, request: Request, service: ServiceDep) -> Response:
    """Run the model on a tensor ``image``: class scores, or score maps for larger images."""
    return await _infer(service, request, _model(service, name, None))


@router.post(
    "/models/{name}/versions/{version}/infer",
    responses={**_errors(400, 413), 200: {"description": "The inference response."}},
    openapi_extra=INFER_BODY,
)
async def infer_version(
    name: ModelName, version: Version, request: Request, service: ServiceDep
) -> Response:
    """Run one version of the model (see ``/v2/models/{name}/infer``)."""
    return await _infer(service, request, _model(service, name, version))


async def _infer(service: Any, request: Request, model: LoadedModel) -> Response:
    settings = service.settings
    fcn = model.fcn
    C, th, tw = fcn.input_shape
    lane_name = "predict"
    service.lanes[lane_name].check_room()
    body = await read_body(request, settings.max_body_bytes)
    # Parsed off the event loop: the JSON of a large tensor takes a while.
    inference, image = await asyncio.to_thread(
        _parse, body, request.headers.get(HEADER_LENGTH.lower())
    )
    if image.dtype == np.uint8:
        N, H, W, channels = image.shape
    else:
        N, channels, H, W = image.shape
    if channels != C:
        raise _bad(f"input 'image' has {channels} channel(s); model {model.name!r} takes {C}")
    if N * H * W > settings.max_pixels:
        raise ServiceError(
            413,
            "image_too_large",
            f"input 'image' has {N * H * W:,} pixels, more than the limit of "
            f"{settings.max_pixels:,}",
        )
    if H < th or W < tw:
        raise _bad(f"input 'image' is {H}x{W}, smaller than the model's {th}x{tw} window")
    classify = (H, W) == (th, tw)
    if not classify and image.dtype != np.uint8:
        raise _bad(
            f"an FP32 input must be the training size {th}x{tw}; for a score map of a larger "
            "image send it as UINT8 (N, H, W, C)"
        )
    outputs = _outputs(inference, _CLASS_OUTPUTS if classify else _MAP_OUTPUTS)
    if classify:  # off the event loop: decoding many UINT8 images takes a while
        x = await asyncio.to_thread(_classify_inputs, model, image)
        scores = await service.classify(request, model, x)  # (N, K)
        if not np.all(np.isfinite(scores)):  # finite FP32 values too large for the network
            raise _bad(
                "input 'image' (FP32) overflows the network: its scores are not finite; "
                "send it preprocessed as the model's metadata says (values of order 1)"
            )
        results = {"scores": scores, "probabilities": _softmax(scores, 1)}
    else:
        rows, cols = fcn.geometry.map_size(H, W)
        if N * rows * cols > settings.max_map_cells:
            raise _bad(
                f"{N} map(s) of {rows}x{cols} cells: more than the limit of "
                f"{settings.max_map_cells:,} cells"
            )
        as_json = [name for name, binary in outputs if not binary]
        if as_json and N * rows * cols > settings.max_json_cells:
            raise _bad(
                f"{N} map(s) of {rows}x{cols} cells: more than the {settings.max_json_cells:,} "
                f"cells whose values a JSON answer carries ({', '.join(as_json)}); ask for them "
                'as binary data ("binary_data_output": true), or send a smaller image'
            )
        lane_name = "scoremap"
        lane = service.lanes[lane_name]
        pixels = np.ascontiguousarray(image.transpose(0, 3, 1, 2))

        def work() -> np.ndarray:
            return np.stack(
                [dense_score_map(fcn, p, tile_memory=settings.tile_memory).logits for p in pixels]
            )

        with lane.admit():
            maps, _ = await lane.run(request, model, work)  # (N, K, H', W')
        maps = maps.astype(np.float32)
        results = {"score_map": maps, "probability_map": _softmax(maps, 1)}
    # encoded off the event loop: a map's JSON can take a while, and /healthz must not wait
    return await asyncio.to_thread(_answer, model, inference.get("id"), outputs, results)


def _answer(model: LoadedModel, request_id: Any, outputs: list, results: dict) -> Response:
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if isinstance(request_id, str):
        head["id"] = request_id
    tensors, blobs = [], []
    for name, binary in outputs:
        array = np.ascontiguousarray(results[name], dtype="<f4")
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    head["outputs"] = tensors
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
