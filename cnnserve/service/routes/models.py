"""Routes that list the models served: ``/v1/models`` and ``/v1/models/{name}``.

Both answer 503 while the models are loading; ``/v1/models/{name}`` answers 404 for a name
that is not served (a name, never a path).
"""

from __future__ import annotations

from fastapi import APIRouter

from cnnserve.service.deps import LOOKUP_ERRORS, ModelName, ServiceDep
from cnnserve.service.schemas import ModelDetail, ModelList

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
