"""The FastAPI application: class scores and dense score maps over HTTP.

:func:`create_app` builds an app from :class:`~cnnserve.service.settings.Settings`. On startup
(FastAPI's lifespan) it checks the model directory, then loads, converts and warms up every
model in a background thread: ``/healthz`` answers at once, ``/readyz`` and the model routes
answer 503 until the models are ready.

Inference runs in worker threads, off the event loop (the Cython kernels release the GIL).
``/predict`` and ``/scoremap`` each run at most ``max_concurrency`` inferences at once, on
threads of their own, so that large maps never hold up classifications; a request that finds
no free slot within ``queue_timeout`` seconds gets a 503 with ``Retry-After``. Request bodies
are read in chunks and refused with a 413 as soon as they pass ``max_body_bytes``; images are
refused with a 413 before decoding when they have more than ``max_pixels`` pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from cnnserve import __version__
from cnnserve.dense import (
    ImageError,
    ImageTooLargeError,
    class_index,
    default_class,
    encode_array,
    read_image,
)
from cnnserve.dense import score_map as dense_score_map
from cnnserve.heatmap import MAX_PICTURE_PIXELS, png_bytes
from cnnserve.predict import predict as classify
from cnnserve.service.errors import ServiceError, install_error_handlers
from cnnserve.service.metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from cnnserve.service.registry import LoadedModel, ModelRegistry
from cnnserve.service.schemas import (
    ErrorResponse,
    Health,
    ModelDetail,
    ModelList,
    PredictResponse,
    Ready,
    ScoreMapResponse,
)
from cnnserve.service.settings import Settings

__all__ = ["IMAGE_TYPES", "create_app"]

log = logging.getLogger("cnnserve.service")

# Media types of raw image bodies the decoder reads (read_image: PNG, JPEG, BMP, GIF, TIFF).
IMAGE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
    "image/gif",
    "image/tiff",
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "The body is not a decodable image, or a multipart body has no `file` field.",
        404: "No model of that name is loaded.",
        413: "The body is larger than the byte limit, or the image has more pixels than the "
        "pixel limit (checked before decoding).",
        415: "The body is neither multipart/form-data nor a supported image/* type.",
        422: "A bad query parameter, or an image smaller than the model's window.",
        503: "Models are still loading, or every inference slot stayed busy for the queue "
        "timeout (see Retry-After).",
    }.items()
}

_LOOKUP_ERRORS = {status: _ERRORS[status] for status in (404, 503)}

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with a `file` field (`curl -F "
        "file=@digit.png`), or the raw bytes with an image media type (`curl --data-binary "
        "@digit.png -H 'Content-Type: image/png'`). PNG, JPEG, BMP, GIF or TIFF.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_STATIC = resources.files("cnnserve.service") / "static"

ModelName = Annotated[str, Path(description="A model's name, as listed by GET /v1/models.")]
TopK = Annotated[
    int, Query(ge=1, description="How many classes to return (clamped to the classes).")
]


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def _too_large(limit: int) -> ServiceError:
    return ServiceError(
        413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes"
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ServiceError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _check_image_type(media: str, where: str) -> None:
    if media.startswith("image/") and media not in IMAGE_TYPES:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{where} is {media}; supported images: PNG, JPEG, BMP, GIF, TIFF",
        )


async def _image_bytes(request: Request, limit: int) -> bytes:
    """The encoded image of a request: a multipart ``file`` field or a raw image/* body."""
    media = _media_type(request.headers.get("content-type"))
    if media == "multipart/form-data":
        body = await _read_body(request, limit)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        form_request = Request(request.scope, replay)
        try:
            form = await form_request.form(max_files=1, max_fields=16)
        except (MultiPartException, StarletteHTTPException) as exc:  # Starlette wraps the first
            detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
            raise ServiceError(400, "invalid_multipart", f"bad multipart body: {detail}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ServiceError(
                    400,
                    "missing_file",
                    "the multipart body has no file field named 'file' (curl -F file=@image.png)",
                )
            _check_image_type(_media_type(upload.content_type), "the uploaded file")
            data = await upload.read()
        finally:
            await form.close()
    elif media.startswith("image/"):
        _check_image_type(media, "the body")
        data = await _read_body(request, limit)
    else:
        shown = media or "missing"
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"Content-Type {shown} is not accepted: send multipart/form-data with a 'file' "
            "field, or the image bytes with an image/* type (e.g. image/png)",
        )
    if not data:
        raise ServiceError(400, "invalid_image", "the image is empty (0 bytes)")
    return data


def _decode(data: bytes, model: LoadedModel, max_pixels: int) -> np.ndarray:
    """(C, H, W) float32 pixels in [0, 1] of an upload, or a 400 / 413."""
    try:
        return read_image(data, model.fcn.input_shape[0], max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ServiceError(413, "image_too_large", str(exc)) from None
    except ImageError as exc:
        raise ServiceError(400, "invalid_image", str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class _Lane:
    """Inference slots and threads for one endpoint.

    ``/predict`` and ``/scoremap`` each have their own lane, so that a few large maps never
    make a classification wait for them: each lane runs at most ``max_concurrency``
    inferences, on as many threads, and lets at most ``max_waiting`` more wait.
    """

    def __init__(self, endpoint: str, settings: Settings, metrics: Metrics) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.metrics = metrics
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        # Always the same threads, so that each keeps its OpenMP thread team and scratch
        # buffers warm from one request to the next (a new thread would start a new team).
        self.executor = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix=f"cnnserve-{endpoint}"
        )
        self.admitted = 0  # requests in (reading, waiting, running): touched on the loop only

    def _busy(self, why: str) -> ServiceError:
        self.metrics.rejected.labels(self.endpoint).inc()
        return ServiceError(503, "busy", f"{why}; retry later", {"Retry-After": "1"})

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request from its arrival to its answer.

        At most ``max_concurrency`` run and ``max_waiting`` wait (their bodies read, or being
        read); a request beyond them is refused at once, before its body is read, so that the
        memory held by waiting bodies stays bounded.
        """
        s = self.settings
        if self.admitted >= s.max_concurrency + s.max_waiting:
            raise self._busy(
                f"{s.max_concurrency} {self.endpoint} inferences are running and "
                f"{s.max_waiting} waiting"
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, request: Request, model: LoadedModel, work: Any) -> Any:
        """``work()`` on one of the lane's threads, once a slot is free: ``(result, seconds)``.

        Waits up to ``queue_timeout`` for a slot (then a 503). A request whose client has
        gone while it waited is dropped. The slot is held until the thread has finished, even
        if the request is cancelled meanwhile, so that slots never outnumber busy threads.
        """
        s, m, slots = self.settings, self.metrics, self.slots
        waiting = m.waiting.labels(self.endpoint)
        waiting.inc()
        try:
            if slots.locked():
                await asyncio.wait_for(slots.acquire(), s.queue_timeout)
            else:
                await slots.acquire()
        except TimeoutError:
            raise self._busy(
                f"all {s.max_concurrency} {self.endpoint} slots stayed busy for "
                f"{s.queue_timeout:g} s"
            ) from None
        finally:
            waiting.dec()
        try:
            if await request.is_disconnected():
                raise ClientDisconnect()
        except BaseException:
            slots.release()
            raise
        running = m.in_progress.labels(self.endpoint)
        running.inc()

        def timed() -> tuple[Any, float]:
            start = time.perf_counter()
            return work(), time.perf_counter() - start

        def done(_: asyncio.Future) -> None:
            running.dec()
            slots.release()

        future = asyncio.get_running_loop().run_in_executor(self.executor, timed)
        future.add_done_callback(done)
        result, seconds = await asyncio.shield(future)
        m.inference.labels(model.name, self.endpoint).observe(seconds)
        m.images.labels(model.name, self.endpoint).inc()
        return result, seconds


class _Service:
    """Everything the routes share: settings, models, metrics, the lanes."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.lanes: dict[str, _Lane] = {}  # made in the lifespan, on its event loop

    def require_ready(self) -> None:
        if not self.registry.finished:
            raise ServiceError(
                503, "not_ready", "models are still loading; retry shortly", {"Retry-After": "1"}
            )

    def model(self, name: str) -> LoadedModel:
        """A loaded model by name (a 404 for any other name): never a path."""
        self.require_ready()
        reg = self.registry
        found = reg.models.get(name)
        if found is None:
            served = ", ".join(sorted(reg.models)) or "none"
            raise ServiceError(404, "model_not_found", f"no model named {name!r}; served: {served}")
        return found


def create_app(settings: Settings | None = None, *, registry: ModelRegistry | None = None):
    """The service's FastAPI app.

    Parameters
    ----------
    settings : Settings, optional
        Defaults to ``Settings()``: the defaults and the ``CNNSERVE_*`` environment.
    registry : ModelRegistry, optional
        For tests: a registry with its own loader. Defaults to the models of
        ``settings.models``.

    Returns
    -------
    fastapi.FastAPI
    """
    settings = settings or Settings()
    registry = registry or ModelRegistry(settings.models, warmup=settings.warmup)
    metrics = Metrics()
    service = _Service(settings, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.discover()  # a missing or empty directory stops the start-up here
        service.lanes = {name: _Lane(name, settings, metrics) for name in ("predict", "scoremap")}
        log.info(
            "loading %d model file(s) from %s", len(registry.files), registry.directory.resolve()
        )
        loading = asyncio.get_running_loop().run_in_executor(
            service.lanes["predict"].executor,  # the warm-up warms an inference thread
            functools.partial(registry.load_all, on_loaded=lambda _: metrics.models_loaded.inc()),
        )
        yield
        try:
            await asyncio.shield(loading)  # a shutdown during loading waits for it to end
        finally:
            for lane in service.lanes.values():
                lane.executor.shutdown(wait=True)
            metrics.process_exit()

    app = FastAPI(
        title="cnnserve",
        version=__version__,
        summary="Class scores and dense class-score maps from small CNNs.",
        description=(
            "POST an image for its top-k classes (`/predict`), or a large image for a map of "
            "class scores over every training-size window (`/scoremap`), as numbers or as a "
            'heatmap picture. Errors are JSON: `{"error": {"code", "message"}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.routes)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict:
        """The process is alive (it may still be loading models)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Ready,
        tags=["health"],
        responses={503: {"model": ErrorResponse, "description": "Not ready."}},
    )
    async def readyz() -> dict:
        """Every model is loaded, converted and warmed up (at least one is served)."""
        if not registry.finished:
            done = len(registry.models) + len(registry.failed)
            raise ServiceError(
                503,
                "not_ready",
                f"loading models ({done} of {len(registry.files)} done)",
                {"Retry-After": "1"},
            )
        if not registry.models:
            failures = "; ".join(registry.failed.values())
            raise ServiceError(503, "not_ready", f"no model could be loaded: {failures}")
        return {"status": "ready", "models": sorted(registry.models), "failed": registry.failed}

    for path, endpoint in (("/", index), ("/healthz", healthz), ("/readyz", readyz)):
        # HEAD too, for monitors that probe with it (not in the docs: GET documents them)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: requests, latencies, inference time, images processed."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, tags=["models"], responses=_LOOKUP_ERRORS)
    async def list_models() -> dict:
        """The models served, with their input shape, classes and dense geometry."""
        service.require_ready()
        return {"models": [m.summary() for _, m in sorted(registry.models.items())]}

    @app.get(
        "/v1/models/{name}", response_model=ModelDetail, tags=["models"], responses=_LOOKUP_ERRORS
    )
    async def model_detail(name: ModelName) -> dict:
        """One model: the summary, its architecture, training record and self-check."""
        return service.model(name).detail()

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        tags=["inference"],
        responses=_ERRORS,
        openapi_extra=_IMAGE_BODY,
    )
    async def predict(name: ModelName, request: Request, top_k: TopK = 5) -> dict:
        """The top-k classes of an image.

        The image is classified as a whole: one of another size than the training size is
        resized to it (bilinear, antialiased when it shrinks) first. For where in a large
        image each class is, use `/scoremap`.
        """
        model = service.model(name)
        lane = service.lanes["predict"]
        with lane.admit():
            data = await _image_bytes(request, settings.max_body_bytes)

            def work() -> Any:
                pixels = _decode(data, model, settings.max_pixels)
                return classify(model.fcn, pixels)

            result, seconds = await lane.run(request, model, work)
        service.metrics.pixels.labels(model.name, "predict").inc(
            result.image_size[0] * result.image_size[1]
        )
        return {
            "model": model.name,
            "predictions": result.top_k(top_k),
            "image_size": list(result.image_size),
            "resized_to": list(result.resized_to) if result.resized_to else None,
            "time_ms": round(seconds * 1e3, 3),
        }

    @app.post(
        "/v1/models/{name}/scoremap",
        response_model=ScoreMapResponse,
        tags=["inference"],
        responses={
            **_ERRORS,
            200: {
                "description": "`format=json`: the score map. `format=png`: the heatmap of "
                "the class over the image.",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def scoremap(
        name: ModelName,
        request: Request,
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
            Query(ge=1, le=64, description="Draw the heatmap this many times the image's size."),
        ] = 1,
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
        in the image's own pixels. JSON arrays come as base64 of little-endian float32 (int32
        for indices and boxes) with their shape.
        """
        model = service.model(name)
        fcn = model.fcn
        try:
            fcn.geometry.finer(stride_divisor)
            chosen = None if class_ is None else class_index(class_, fcn.class_names)
        except ValueError as exc:
            raise ServiceError(422, "invalid_parameter", str(exc)) from None
        lane = service.lanes["scoremap"]
        with lane.admit():
            data = await _image_bytes(request, settings.max_body_bytes)

            def work() -> Any:
                started = time.perf_counter()
                pixels = _decode(data, model, settings.max_pixels)
                _check_map(fcn, pixels.shape[1:], stride_divisor, format, zoom, arrays, settings)
                result = dense_score_map(
                    fcn, pixels, stride_divisor=stride_divisor, tile_memory=settings.tile_memory
                )
                index = chosen if chosen is not None else default_class(result)
                if format == "png":
                    picture = result.heatmap(pixels, index, alpha=alpha, zoom=zoom)
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
        return Response(
            body,
            media_type="image/png",
            headers={
                "X-Cnnserve-Class": urllib.parse.quote(label, safe=""),
                "X-Cnnserve-Class-Index": str(index),
                "X-Cnnserve-Map-Shape": f"{result.shape[0]}x{result.shape[1]}",
                "X-Cnnserve-Time-Ms": f"{seconds * 1e3:.3f}",
            },
        )

    return app


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
    if format == "png" and H * W * zoom**2 > MAX_PICTURE_PIXELS:
        raise ServiceError(
            422,
            "invalid_parameter",
            f"zoom {zoom} would draw a {W * zoom}x{H * zoom} picture, more than "
            f"{MAX_PICTURE_PIXELS:,} pixels",
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
