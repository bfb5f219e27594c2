"""FastAPI dependencies, injected into routes through ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from .errors import ModelNotReadyError
from .models import ModelManager
from .predictor import Predictor
from .settings import ServingSettings
from .state import ModelState

__all__ = ["SettingsDep", "ModelStateDep", "ModelsDep", "PredictorDep"]


# ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, two thread hand-offs
# per request for what are attribute reads.


async def get_settings(request: Request) -> ServingSettings:
    return request.app.state.settings


async def get_models(request: Request) -> ModelManager:
    return request.app.state.models


async def get_model_state(request: Request) -> ModelState:
    """The champion's state (readiness)."""
    return request.app.state.models.champion


SettingsDep = Annotated[ServingSettings, Depends(get_settings)]
ModelsDep = Annotated[ModelManager, Depends(get_models)]
ModelStateDep = Annotated[ModelState, Depends(get_model_state)]


async def get_predictor(model: ModelStateDep) -> Predictor:
    try:
        return model.require()
    except ModelNotReadyError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
