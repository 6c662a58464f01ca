"""Routes that tell how the service is: the web page, liveness, readiness and metrics.

``/healthz`` answers as soon as the process runs; ``/readyz`` once every model file has been
loaded, converted and warmed up (503 before, and when a model file failed to load, with the
reasons, unless ``allow_failed`` is set; 503 always when no model could be loaded). ``/``,
``/healthz`` and ``/readyz`` answer HEAD as well as GET. ``/metrics`` is Prometheus' text.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from cnnserve.service.deps import STATIC, ServiceDep
from cnnserve.service.metrics import CONTENT_TYPE_LATEST
from cnnserve.service.schemas import ErrorResponse, Health, Ready

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page: upload an image, see its classes and its heatmap."""
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


@router.get("/healthz", response_model=Health)
async def healthz() -> dict:
    """The process is alive (it may still be loading models)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": ErrorResponse, "description": "Not ready."}},
)
async def readyz(service: ServiceDep) -> dict:
    """Every model is loaded, converted and warmed up.

    503 while loading, when no model loaded, and when any model file failed (with the
    reasons), unless the service runs with `allow_failed`: then 200 lists the failures.
    """
    service.check_ready()
    registry = service.registry
    return {"status": "ready", "models": sorted(registry.models), "failed": registry.failed}


# HEAD too, for monitors that probe with it (not in the docs: GET documents them)
router.add_api_route("/", index, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", response_class=Response)
async def prometheus(service: ServiceDep) -> Response:
    """Prometheus metrics: requests, latencies, inference time, images processed."""
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
