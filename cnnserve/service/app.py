"""The FastAPI application: class scores and dense score maps over HTTP.

:func:`create_app` builds an app from :class:`~cnnserve.service.settings.Settings`: the error
handlers, the metrics middleware, the static web page and the routers of
:mod:`cnnserve.service.routes`, with a :class:`~cnnserve.service.deps.Service` in
``app.state.service`` that the routes receive as a dependency. On startup, :func:`lifespan`
checks the model directory, then loads, converts and warms up every model in a background
thread: ``/healthz`` answers at once, ``/readyz`` and the model routes answer 503 until the
models are ready.

Inference runs in worker threads, off the event loop (the Cython kernels release the GIL).
``/predict`` and ``/scoremap`` each run at most ``max_concurrency`` inferences at once, on
threads of their own, so that large maps never hold up classifications; a request that finds
no free slot within ``queue_timeout`` seconds gets a 503 with ``Retry-After``. Request bodies
are read in chunks and refused with a 413 as soon as they pass ``max_body_bytes``; images are
refused with a 413 before decoding when they have more than ``max_pixels`` pixels.
Classifications of ``/predict`` and of the Open Inference Protocol's ``infer`` run in dynamic
batches (:mod:`cnnserve.service.batching`) when ``max_batch_size`` is over 1; with ``watch``
on, :func:`watch` reloads a model whose file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from cnnserve import __version__
from cnnserve.service.batching import Batcher
from cnnserve.service.deps import STATIC, Lane, Service, reject_unknown_query
from cnnserve.service.errors import install_error_handlers
from cnnserve.service.guards import EncodedSlashGuard
from cnnserve.service.metrics import Metrics, MetricsMiddleware
from cnnserve.service.registry import ModelRegistry, load_one
from cnnserve.service.routes import activations, detect, docs, health, inference, models, v2
from cnnserve.service.schemas import ErrorResponse
from cnnserve.service.settings import Settings

__all__ = ["create_app", "lifespan", "watch"]

log = logging.getLogger("cnnserve.service")


async def watch(service: Service) -> None:
    """Reload every model whose file changes (a new version, a changed or new file), every
    ``watch_interval`` seconds, once the start-up loading is done: until cancelled."""
    registry = service.registry
    while True:
        await asyncio.sleep(service.settings.watch_interval)
        if not registry.finished:
            continue
        try:
            changed = await asyncio.to_thread(registry.changed)
        except OSError as exc:  # the directory went away, or a file while it was read
            log.error("watching %s: %s", registry.directory, exc)
            continue
        for source in changed:
            try:
                model = await asyncio.to_thread(registry.reload, source.name, source)
            except (RuntimeError, KeyError, OSError) as exc:
                log.error("model %r not reloaded, the version served stays: %s", source.name, exc)
            else:
                service.metrics.models_loaded.inc()
                log.info("watch: model %r now serves version %s", model.name, model.version)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The service's start-up and shutdown, around the time it serves.

    Start-up checks the model directory (a missing or empty one stops it), makes the
    inference lanes and starts loading every model on a thread of the ``predict`` lane.
    Shutdown waits for the loading to end, then for the lanes' threads.

    Parameters
    ----------
    app : FastAPI
        An app of :func:`create_app`: its ``state.service`` is the :class:`Service`.
    """
    service: Service = app.state.service
    registry, settings, metrics = service.registry, service.settings, service.metrics
    registry.discover()  # a missing or empty directory stops the start-up here
    service.lanes = {name: Lane(name, settings, metrics) for name in ("predict", "scoremap")}
    if settings.max_batch_size > 1:
        service.batcher = Batcher(
            service.lanes["predict"], settings.max_batch_size, settings.max_batch_delay_ms / 1e3
        )
    log.info("loading %d model file(s) from %s", len(registry.files), registry.directory.resolve())
    loading = asyncio.get_running_loop().run_in_executor(
        service.lanes["predict"].executor,  # the warm-up warms an inference thread
        functools.partial(registry.load_all, on_loaded=lambda _: metrics.models_loaded.inc()),
    )
    watcher = asyncio.ensure_future(watch(service)) if settings.watch else None
    yield
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    try:
        await asyncio.shield(loading)  # a shutdown during loading waits for it to end
    finally:
        for lane in service.lanes.values():
            lane.executor.shutdown(wait=True)
        metrics.process_exit()


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
    registry = registry or ModelRegistry(
        settings.models,
        warmup=settings.warmup,
        loader=functools.partial(
            load_one,
            max_pixels=settings.max_model_pixels,
            max_params=settings.max_model_params,
            max_layers=settings.max_model_layers,
        ),
    )
    metrics = Metrics()

    app = FastAPI(
        title="cnnserve",
        version=__version__,
        summary="Class scores and dense class-score maps from small CNNs.",
        description=(
            "POST an image for its top-k classes (`/predict`), or a large image for a map of "
            "class scores over every training-size window (`/scoremap`), as numbers or as a "
            "heatmap picture, or for the boxes where a class is (`/detect`). Errors are JSON: "
            '`{"error": {"code", "message"}}`.'
        ),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their assets from a CDN: these are served here
        redoc_url=None,
        dependencies=[Depends(reject_unknown_query)],  # 422 for any undeclared query parameter
        responses={422: {"model": ErrorResponse, "description": "A bad query parameter."}},
    )
    app.state.service = Service(settings, registry, metrics)
    install_error_handlers(app)
    app.add_middleware(EncodedSlashGuard)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.routes)  # outermost
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    if docs.ASSETS is not None:
        app.mount(docs.ASSETS_URL, StaticFiles(directory=str(docs.ASSETS)), name="docs-assets")
    for routes in (health, docs, models, inference, detect, activations, v2):
        app.include_router(routes.router)
    return app
