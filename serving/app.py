"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from imaging.errors import ImagingError
from registry.errors import RegistryError
from registry.load import LoadedModel, load_model
from registry.store import default_store

from .predictor import Predictor
from .routes import health_router, predict_router
from .settings import ServingSettings
from .state import ModelState

__all__ = ["ModelLoader", "create_app", "registry_loader"]

log = logging.getLogger(__name__)

#: Loads a model URI; the seam that tests and the CLI replace.
ModelLoader = Callable[[str], LoadedModel]


def registry_loader(uri: str) -> LoadedModel:
    """Load ``uri`` from the default registry store (``$FEDSEG_HOME`` or the tracking URI)."""
    return load_model(default_store(), uri)


def _load(settings: ServingSettings, loader: ModelLoader, state: ModelState) -> None:
    try:
        model = loader(settings.model_uri)
        state.predictor = Predictor(model, device=settings.device, batch_size=settings.batch_size)
    except (RegistryError, ImagingError) as exc:
        state.reason = str(exc)
        log.error("cannot serve %s: %s", settings.model_uri, exc)
    except Exception as exc:  # keep the service up and say why it is not ready
        state.reason = f"{type(exc).__name__}: {exc}"
        log.exception("cannot serve %s", settings.model_uri)
    else:
        log.info("serving %s (%s version %d)", settings.model_uri, model.name, model.version)


def create_app(settings: ServingSettings | None = None, loader: ModelLoader = registry_loader) -> FastAPI:
    """Build the service.

    The model is loaded during the lifespan start-up, off the event loop. If loading fails the
    service still starts: ``/health/live`` answers 200, ``/health/ready`` and ``/v1/predict``
    503 with the reason.

    Parameters
    ----------
    settings : ServingSettings, optional
        Default: read from ``FEDSEG_SERVE_*`` environment variables.
    loader : callable
        ``uri -> LoadedModel``; default :func:`registry_loader`.
    """
    settings = settings or ServingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_load, settings, loader, app.state.model)
        yield

    app = FastAPI(
        title="fedseg",
        summary="Lesion segmentation and triage of DICOM series with the federated U-Net.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.model = ModelState(model_uri=settings.model_uri)
    app.include_router(health_router)
    app.include_router(predict_router)
    return app
