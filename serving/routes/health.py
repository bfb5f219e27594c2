"""``/health``: liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from ..deps import ModelStateDep
from ..schemas import LiveResponse, NotReadyResponse, ReadyResponse

__all__ = ["router"]

router = APIRouter(prefix="/health", tags=["health"])


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
