"""Prometheus metrics of the service, and the ASGI middleware that counts every request.

Each app has its own registry, so that several apps in one process (the tests) do not share
counts. With several uvicorn workers, ``cnnserve serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start: each worker then writes its values to files there, and
``/metrics`` on any worker reports the sum over all of them (prometheus-client's multiprocess
mode).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

# Request latency: from a health check (~100 us) to a large score map (tens of seconds).
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


def _multiprocess_dir() -> str | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and os.path.isdir(path) else None


class Metrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cnnserve_http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cnnserve_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method and route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "cnnserve_inference_duration_seconds",
            "Time spent in the network (decoding, preprocessing, forward pass, encoding the "
            "result), by model and endpoint; waiting for a slot is not included.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "cnnserve_images_processed_total",
            "Images that went through a network, by model and endpoint.",
            ["model", "endpoint"],
            registry=r,
        )
        self.pixels = Counter(
            "cnnserve_image_pixels_processed_total",
            "Pixels of the images that went through a network, by model and endpoint.",
            ["model", "endpoint"],
            registry=r,
        )
        self.in_progress = Gauge(
            "cnnserve_inferences_in_progress",
            "Inferences running now, by endpoint.",
            ["endpoint"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.waiting = Gauge(
            "cnnserve_inferences_waiting",
            "Requests waiting for an inference slot now, by endpoint.",
            ["endpoint"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "cnnserve_inferences_rejected_total",
            "Requests refused with a 503 busy: too many waiting, or no slot free in time.",
            ["endpoint"],
            registry=r,
        )
        self.models_loaded = Gauge(
            "cnnserve_models_loaded",
            "Models loaded, converted and warmed up (per worker).",
            registry=r,
            multiprocess_mode="liveall",
        )

    def process_exit(self) -> None:
        """In multiprocess mode, drop this worker's live gauges (in progress, waiting)."""
        path = _multiprocess_dir()
        if path is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (summed over workers if several)."""
        path = _multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)
        return generate_latest(merged)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request and times it, by route template.

    The route label is the matched route's path template (``/v1/models/{name}/predict``, or a
    mount's prefix such as ``/static``), never the raw path, and the method label is one of
    the standard methods or ``other``, so that a scan of random URLs or methods cannot blow
    up the number of series; requests that match no route count as ``unmatched``.

    Parameters
    ----------
    app : ASGI app
        The app below this middleware.
    metrics : Metrics
    routes : sequence of starlette routes
        The app's routes, to label a request whose route the router did not record.
    """

    def __init__(self, app: Any, metrics: Metrics, routes: Any = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: dict, original: dict) -> str:
        route = scope.get("route")
        if route is None:  # Starlette records only some routes in the scope
            from starlette.routing import Match

            # matched against the scope as it came: a mount rewrites root_path on its way down
            route = next((r for r in self.routes if r.matches(original)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        original = dict(scope)  # the router updates the scope in place
        status = 500  # if the app raises before it starts a response

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            label = self._route(scope, original)
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            self.metrics.requests.labels(method, label, str(status)).inc()
            self.metrics.latency.labels(method, label).observe(time.perf_counter() - start)
