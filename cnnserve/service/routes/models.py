"""Routes that list the models served: ``/v1/models`` and ``/v1/models/{name}``, and
``POST /v1/models/{name}/reload``.

Both answer 503 while the models are loading; ``/v1/models/{name}`` answers 404 for a name
that is not served (a name, never a path). A reload loads and warms the model's current file
(the highest version of a versioned directory) next to the version served, then swaps; a
file that fails to load leaves the served version in place (a 422 that says why).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from cnnserve.service.deps import ERROR_RESPONSES, LOOKUP_ERRORS, ModelName, ServiceDep
from cnnserve.service.errors import ServiceError
from cnnserve.service.schemas import ModelDetail, ModelList, Reloaded

__all__ = ["router"]

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=LOOKUP_ERRORS)
async def list_models(service: ServiceDep) -> dict:
    """The models served, with their input shape, classes and dense geometry."""
    service.require_ready()
    return {"models": [m.summary() for _, m in sorted(service.registry.models.items())]}


@router.get("/v1/models/{name}", response_model=ModelDetail, responses=LOOKUP_ERRORS)
async def model_detail(name: ModelName, service: ServiceDep) -> dict:
    """One model: the summary, its architecture, training record and self-check."""
    return service.model(name).detail()


@router.post(
    "/v1/models/{name}/reload",
    response_model=Reloaded,
    responses={**LOOKUP_ERRORS, 422: ERROR_RESPONSES[422]},
)
async def reload_model(name: ModelName, service: ServiceDep) -> dict:
    """Load the model's current file next to the version served, warm it up, then swap.

    Requests that already run on the old version finish with it. A file that fails to load
    never replaces the version served: a 422 says why, and the old version keeps serving.
    """
    service.require_ready()
    registry = service.registry
    previous = registry.models.get(name)
    try:
        model = await asyncio.to_thread(registry.reload, name)
    except KeyError:
        raise ServiceError(
            404, "model_not_found", f"no model named {name!r} in the model directory"
        ) from None
    except RuntimeError as exc:
        kept = f"; version {previous.version} still serves" if previous else ""
        raise ServiceError(422, "reload_failed", f"cannot load {name!r}: {exc}{kept}") from None
    return {
        "name": model.name,
        "version": model.version,
        "previous": previous.version if previous else None,
        "load_seconds": round(model.load_seconds, 4),
    }
