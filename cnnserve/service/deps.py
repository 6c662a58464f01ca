"""What the routes share: the service's state, request bodies, images, FastAPI dependencies.

:class:`Service` holds the settings, the model registry, the metrics and the inference
:class:`Lane` of each endpoint; :func:`create_app <cnnserve.service.app.create_app>` keeps one in
``app.state.service`` and the routes receive it through :data:`ServiceDep`
(``Depends(get_service)``). :func:`image_bytes` reads the image of a request (a multipart
``file`` field or a raw image/* body, refused with a 413 as soon as it passes the byte limit)
and :func:`decode_image` turns it into pixels, or a 400 / 413. The annotated parameters and the
documented error responses here are the ones several routes declare in the OpenAPI docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Path, Query, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from cnnserve.images import ImageError, ImageTooLargeError, read_image
from cnnserve.predict import network_input, prediction
from cnnserve.service.errors import ServiceError
from cnnserve.service.metrics import Metrics
from cnnserve.service.registry import LoadedModel, ModelRegistry
from cnnserve.service.schemas import ErrorResponse
from cnnserve.service.settings import Settings

__all__ = [
    "ERROR_RESPONSES",
    "IMAGE_BODY",
    "IMAGE_TYPES",
    "LOOKUP_ERRORS",
    "STATIC",
    "BodyBudget",
    "Lane",
    "ModelName",
    "Service",
    "ServiceDep",
    "TopK",
    "class_scores",
    "decode_image",
    "get_service",
    "image_bytes",
    "read_body",
    "reject_unknown_query",
]

# Media types of raw image bodies the decoder reads (read_image: PNG, JPEG, BMP, GIF, TIFF,
# WebP).
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
    "image/webp",
)

# The static web page's directory: mounted at /static, its index.html served at /.
STATIC = resources.files("cnnserve.service") / "static"


# ---------------------------------------------------------------------------------------------
# What the OpenAPI docs say of several routes
# ---------------------------------------------------------------------------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
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

LOOKUP_ERRORS = {status: ERROR_RESPONSES[status] for status in (404, 503)}

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with a `file` field (`curl -F "
        "file=@digit.png`), or the raw bytes with an image media type (`curl --data-binary "
        "@digit.png -H 'Content-Type: image/png'`). PNG, JPEG, BMP, GIF, TIFF or WebP.",
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

ModelName = Annotated[str, Path(description="A model's name, as listed by GET /v1/models.")]
TopK = Annotated[
    int, Query(ge=1, description="How many classes to return (clamped to the classes).")
]


# ---------------------------------------------------------------------------------------------
# Request bodies and images
# ---------------------------------------------------------------------------------------------


def _too_large(limit: int) -> ServiceError:
    return ServiceError(
        413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a request, refused with a 413 as soon as it passes ``limit`` bytes.

    Parameters
    ----------
    request : Request
    limit : int
        The largest body accepted, in bytes.

    Returns
    -------
    bytes

    Raises
    ------
    ServiceError
        400 for a Content-Length that is not a number; 413 for a declared or actual body
        over ``limit``, before more than ``limit`` bytes are held.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ServiceError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    service = getattr(getattr(request.app, "state", None), "service", None)
    held = service.bodies if isinstance(service, Service) else BodyBudget(None)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            held.take(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        held.give_back(sum(len(chunk) for chunk in chunks))


class BodyBudget:
    """The bytes of request bodies a worker holds while it reads them, and their cap.

    Each connection's body is bounded by ``max_body_bytes``; this bounds them together, so
    that ``max_connections`` slow uploads cannot hold ``max_connections * max_body_bytes``.

    Parameters
    ----------
    limit : int or None
        The most bytes held at once (None: no cap).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0  # touched on the event loop only

    def take(self, size: int) -> None:
        """Count ``size`` more bytes held; a 503 if that passes the cap (nothing counted)."""
        if self.limit is not None and self.held + size > self.limit:
            raise ServiceError(
                503,
                "busy",
                f"this server holds {self.limit:,} bytes of request bodies being read "
                "(max_body_memory); retry later",
                {"Retry-After": "1"},
            )
        self.held += size

    def give_back(self, size: int) -> None:
        """The bytes of a body no longer being read (its request has it, or it failed)."""
        self.held -= size


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _check_image_type(media: str, where: str) -> None:
    if media.startswith("image/") and media not in IMAGE_TYPES:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{where} is {media}; supported images: PNG, JPEG, BMP, GIF, TIFF, WebP",
        )


async def image_bytes(request: Request, limit: int) -> bytes:
    """The encoded image of a request: a multipart ``file`` field or a raw image/* body.

    Parameters
    ----------
    request : Request
    limit : int
        The largest body accepted, in bytes (the whole multipart body for a form).

    Returns
    -------
    bytes
        The image file's bytes, not decoded (never empty).

    Raises
    ------
    ServiceError
        400 for a bad multipart body, a form without a ``file`` field or an empty image;
        413 for a body over ``limit``; 415 for any other media type, or an image/* type that
        is not one of :data:`IMAGE_TYPES`.
    """
    media = _media_type(request.headers.get("content-type"))
    if media == "multipart/form-data":
        body = await read_body(request, limit)

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
        data = await read_body(request, limit)
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


def decode_image(data: bytes, model: LoadedModel, max_pixels: int) -> np.ndarray:
    """The pixels of an uploaded image, with its own channels, or a 400 / 413.

    A colour photo stays RGB (``C`` 3) and a grey image grey (``C`` 1) whatever the model's
    channels: :func:`~cnnserve.predict.predict` and :func:`~cnnserve.dense.score_map`
    convert them for the network and say so (``converted``), and pictures are drawn over
    the image as it came. Transparency is flattened over white.

    Parameters
    ----------
    data : bytes
        An encoded image (PNG, JPEG, BMP, GIF, TIFF, WebP).
    model : LoadedModel
        The model the image is for. Its channels do not change the decoding (above).
    max_pixels : int
        The largest image accepted, in pixels (checked before decoding).

    Returns
    -------
    ndarray
        float32 pixels in [0, 1].

    Raises
    ------
    ServiceError
        413 for an image of more than ``max_pixels`` pixels; 400 for bytes that are not a
        decodable image.

    Shape
    -----
    ``(C, H, W)``: ``C`` 1 or 3, the image's own; ``(H, W)`` its own size.
    """
    try:
        return read_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ServiceError(413, "image_too_large", str(exc)) from None
    except ImageError as exc:
        raise ServiceError(400, "invalid_image", str(exc)) from None


async def _disconnected(request: Request) -> None:
    """Return when the client of a request whose body has been read leaves."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def class_scores(fcn: Any, x: np.ndarray) -> np.ndarray:
    """The network's class scores ``(N, K)`` float32 of preprocessed inputs ``(N, C, Th, Tw)``:
    the one call of every classification of the service (batched or not)."""
    return fcn.forward(x)[:, :, 0, 0].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The service's state
# ---------------------------------------------------------------------------------------------


class Lane:
    """Inference slots and threads for one endpoint.

    ``/predict`` and ``/scoremap`` each have their own lane, so that a few large maps never
    make a classification wait for them: each lane runs at most ``max_concurrency``
    inferences, on as many threads, and lets at most ``max_waiting`` more wait.

    Parameters
    ----------
    endpoint : str
        The endpoint's name (``"predict"``, ``"scoremap"``): the metrics' label.
    settings : Settings
    metrics : Metrics
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

    def check_room(self) -> None:
        """Refuse at once (503), before its body is read, a request that could not be admitted.

        Takes nothing: a request is admitted (:meth:`admit`) only once its body is in, so
        that clients that stall mid-upload never hold a place.
        """
        s = self.settings
        if self.admitted >= s.max_concurrency + s.max_waiting:
            raise self._busy(
                f"{s.max_concurrency} {self.endpoint} inferences are running and "
                f"{s.max_waiting} waiting"
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request whose body is in, from then to its answer.

        At most ``max_concurrency`` run and ``max_waiting`` wait; a request beyond them is
        refused at once (503), so that the memory held by waiting bodies stays bounded.
        """
        self.check_room()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def _acquire(self, request: Request | None, abandon: Any = None) -> None:
        """A slot, waiting up to ``queue_timeout`` while watching the client's connection.

        Raises
        ------
        ClientDisconnect
            The client left while the request waited: it never runs (counted as 499).
        ServiceError
            503: no slot came free in time.
        """
        s, slots = self.settings, self.slots
        if not slots.locked():
            await slots.acquire()
            return
        acquiring = asyncio.ensure_future(slots.acquire())
        # The body is in: the connection's next message is its end, when the client leaves.
        # A batch of several requests (request None) waits for ``abandon`` instead: done
        # when every request of the batch has left.
        gone = asyncio.ensure_future(
            _disconnected(request) if request is not None else asyncio.shield(abandon)
        )
        try:
            done, _ = await asyncio.wait(
                {acquiring, gone}, timeout=s.queue_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # the request itself was cancelled
            gone.cancel()
            if not acquiring.cancel() and not acquiring.cancelled():  # it holds a slot
                slots.release()
            raise
        gone.cancel()
        if acquiring in done:
            if gone in done:  # both at once: the client left all the same
                slots.release()
                raise ClientDisconnect()
            return
        # A pending acquire that is cancelled never holds a slot (asyncio.Semaphore).
        acquiring.cancel()
        if gone in done:
            raise ClientDisconnect()
        raise self._busy(
            f"all {s.max_concurrency} {self.endpoint} slots stayed busy for {s.queue_timeout:g} s"
        )

    async def run(
        self,
        request: Request | None,
        model: LoadedModel,
        work: Any,
        images: int = 1,
        abandon: asyncio.Future | None = None,
    ) -> Any:
        """``work()`` on one of the lane's threads, once a slot is free: ``(result, seconds)``.

        Waits up to ``queue_timeout`` for a slot (then a 503), watching the connection: a
        request whose client leaves while it waits is dropped at once and never runs; one
        whose client leaves while it runs is finished but not answered (ClientDisconnect,
        counted as 499). The
        slot is held until the thread has finished, even if the request is cancelled
        meanwhile, so that slots never outnumber busy threads. ``request`` is None for a
        batch of several requests' ``images`` (see :mod:`cnnserve.service.batching`), which
        stops waiting when ``abandon`` is done.
        """
        m, slots = self.metrics, self.slots
        waiting = m.waiting.labels(self.endpoint)
        waiting.inc()
        try:
            await self._acquire(request, abandon if abandon is not None else asyncio.Future())
        finally:
            waiting.dec()
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
        # Watched while it runs too: a client that left meanwhile gets no answer, and its
        # request is counted as 499, not as the 200 nobody received.
        # (A batch has no one connection: each of its requests watches its own, in Service.)
        gone = asyncio.ensure_future(
            _disconnected(request) if request is not None else asyncio.Future()
        )
        try:
            result, seconds = await asyncio.shield(future)
        finally:
            left = gone.done() and not gone.cancelled() and gone.exception() is None
            gone.cancel()
        m.inference.labels(model.name, self.endpoint).observe(seconds)
        m.images.labels(model.name, self.endpoint).inc(images)
        if left:
            raise ClientDisconnect()
        return result, seconds


class Service:
    """Everything the routes share: settings, models, metrics, the lanes.

    Parameters
    ----------
    settings : Settings
    registry : ModelRegistry
    metrics : Metrics
    """

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.lanes: dict[str, Lane] = {}  # made in the lifespan, on its event loop
        self.batcher: Any = None  # a Batcher when batching is on (max_batch_size > 1)
        self.bodies = BodyBudget(settings.max_body_memory)

    async def classify(self, request: Request, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        """The class scores ``(N, K)`` float32 of preprocessed inputs ``x`` ``(N, C, Th, Tw)``.

        Admitted to the ``predict`` lane; run in a batch with other requests' inputs when
        batching is on (:mod:`cnnserve.service.batching`), else alone.
        """
        with self.lanes["predict"].admit():
            return await self._scores(request, model, x)

    async def predict(self, request: Request, model: LoadedModel, data: bytes) -> Any:
        """The :class:`~cnnserve.predict.Prediction` of an encoded image, and its seconds.

        Admitted to the ``predict`` lane, decoded and preprocessed off the event loop, then
        classified (in a batch when batching is on).
        """
        with self.lanes["predict"].admit():
            started = time.perf_counter()

            def prepare() -> Any:
                pixels = decode_image(data, model, self.settings.max_pixels)
                return network_input(model.fcn, pixels)

            x, size, resized, converted = await asyncio.to_thread(prepare)
            scores = await self._scores(request, model, x)
            result = prediction(model.fcn, scores[0], size, resized, converted)
            return result, time.perf_counter() - started

    async def _scores(self, request: Request, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        if self.batcher is None:
            scores, _ = await self.lanes["predict"].run(
                request, model, lambda: class_scores(model.fcn, x), images=len(x)
            )
            return scores
        answer = self.batcher.submit(model, x)
        gone = asyncio.ensure_future(_disconnected(request))  # the body is in: its end
        try:
            done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():  # the client left, or this request was cancelled
                answer.cancel()  # a batch that has not started leaves its inputs out
        if answer in done:
            return answer.result()
        raise ClientDisconnect()

    def check_ready(self) -> None:
        """Nothing when every model file is loaded; else the 503 of ``/readyz``.

        Loading, no model loaded, or a model file that failed (unless ``allow_failed``):
        each a 503 that says why.
        """
        registry = self.registry
        if not registry.finished:
            done = len(registry.models) + len(registry.failed)
            raise ServiceError(
                503,
                "not_ready",
                f"loading models ({done} of {len(registry.files)} done)",
                {"Retry-After": "1"},
            )
        failures = "; ".join(registry.failed.values())
        if not registry.models:
            raise ServiceError(503, "not_ready", f"no model could be loaded: {failures}")
        if registry.failed and not self.settings.allow_failed:
            raise ServiceError(
                503,
                "not_ready",
                f"{len(registry.failed)} model file(s) failed to load (start with "
                f"--allow-failed to serve the others): {failures}",
            )

    def require_ready(self) -> None:
        """Nothing once every model file has been tried; before that, a 503."""
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


# ---------------------------------------------------------------------------------------------
# FastAPI dependencies
# ---------------------------------------------------------------------------------------------


async def get_service(request: Request) -> Service:
    """The app's :class:`Service` (``app.state.service``), for ``Depends``.

    A coroutine, so that FastAPI calls it on the event loop: a plain function would be sent
    to a worker thread on every request.
    """
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route (or dependency) declares, by the name clients send."""
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """A 422 naming every query parameter the matched route does not declare.

    Installed once for the whole app (``FastAPI(dependencies=...)``), so that a misspelt
    parameter (``?treshold=0.9``) is never silently ignored with a 200 on any route.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _query_names(dependant)
    unknown = sorted({key for key in request.query_params} - allowed)
    if unknown:
        shown = ", ".join(repr(key[:40]) for key in unknown[:10])
        accepted = ", ".join(sorted(allowed)) or "none"
        raise ServiceError(
            422,
            "unknown_parameter",
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} {shown} for "
            f"{getattr(route, 'path', request.url.path)}; accepted: {accepted}",
        )
