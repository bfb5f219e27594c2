"""``/health`` and the Open Inference Protocol's ``/v2/health``: liveness and readiness probes.

Ready means the champion is loaded; a failed hot reload keeps the service ready on the version
it served before.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..deps import ModelStateDep
from ..schemas import LiveResponse, NotReadyResponse, ReadyResponse

__all__ = ["router", "oip_router"]

router = APIRouter(prefix="/health", tags=["health"])
oip_router = APIRouter(prefix="/v2/health", tags=["health"])


class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


@router.get("/live")
def live() -> LiveResponse:
    """The process answers (whether or not a model is loaded)."""
    return LiveResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": NotReadyResponse}},
)
def ready(model: ModelStateDep) -> ReadyResponse | JSONResponse:
    """200 with the served model's name and version, or 503 with why there is none."""
    if model.predictor is None:
        body = NotReadyResponse(model_uri=model.model_uri, detail=model.reason)
        return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return ReadyResponse(
        model_uri=model.model_uri,
        model_name=model.predictor.name,
        model_version=model.predictor.version,
    )


@oip_router.get("/live", response_model=OipLive)
def oip_live() -> OipLive:
    """OIP server liveness: ``{"live": true}`` while the process answers."""
    return OipLive(live=True)


@oip_router.get("/ready", response_model=OipReady,
                responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": OipReady}})
def oip_ready(model: ModelStateDep) -> OipReady | JSONResponse:
    """OIP server readiness: ``{"ready": true}`` (200) once the champion is loaded, else 503."""
    if model.predictor is None:
        return JSONResponse(OipReady(ready=False).model_dump(),
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return OipReady(ready=True)
