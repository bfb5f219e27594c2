"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from registry.load import LoadedModel, load_model
from registry.store import default_store

from .drift import DriftCollector, DriftMonitor, recording_references
from .jobs import JobService
from .metrics import MetricsMiddleware, ServingMetrics
from .models import ModelLoader, ModelManager, VersionResolver, registry_resolver
from .predictor import Predictor
from .routes import health_router, predict_router
from .routes.health import oip_router as oip_health_router
from .routes.infer import router as infer_router
from .routes.models import admin_router as models_admin_router
from .routes.models import router as models_router
from .routes.drift import router as drift_router
from .routes.jobs import router as jobs_router
from .routes.metrics import router as metrics_router
from .routes.triage import router as triage_router
from .routes.ui import router as ui_router
from .security import install_security
from .settings import ServingSettings

__all__ = ["ModelLoader", "create_app", "registry_loader", "registry_resolver"]

log = logging.getLogger(__name__)

def registry_loader(uri: str) -> LoadedModel:
    """Load ``uri`` from the default registry store (``$FEDSEG_HOME`` or the tracking URI)."""
    return load_model(default_store(), uri)


def _freeze_heap() -> None:
    """Move what start-up built (torch, MLflow, the compiler, the model: over half a million
    objects) out of the garbage collector's reach. A full collection over it took 150-300 ms,
    a stall every hundred-odd DICOM requests; after this it walks only what requests allocate."""
    gc.collect()
    gc.freeze()


def _manager(settings: ServingSettings, loader: ModelLoader,
             resolver: VersionResolver | None, runner: Executor) -> ModelManager:
    def build(model: LoadedModel) -> Predictor:  # rebuilds the network and warms it up
        return Predictor(
            model, device=settings.device, batch_size=settings.batch_size,
            max_batch_slices=settings.microbatch_max_slices, max_wait_ms=settings.microbatch_wait_ms,
            runner=runner, compile_forward=settings.compile,
        )

    return ModelManager(
        champion_uri=settings.model_uri, challenger_uri=settings.challenger_model_uri,
        canary_share=settings.canary_share, loader=loader, factory=build, resolver=resolver,
        reload_seconds=settings.reload_seconds,
    )


def create_app(
    settings: ServingSettings | None = None,
    loader: ModelLoader = registry_loader,
    resolver: VersionResolver | None = None,
    *,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the service.

    The model is loaded during the lifespan start-up, off the event loop. If loading fails the
    service still starts: ``/health/live`` answers 200, ``/health/ready`` and ``/v1/predict``
    503 with the reason. Then a background thread follows the registry (see
    :mod:`serving.models`): a moved alias is loaded, warmed up and swapped in without a restart.

    Parameters
    ----------
    settings : ServingSettings, optional
        Default: read from ``FEDSEG_SERVE_*`` environment variables.
    loader : callable
        ``uri -> LoadedModel``; default :func:`registry_loader`.
    resolver : callable, optional
        ``models:/NAME@ALIAS -> version``, to follow the registry; default
        :func:`registry_resolver` with the default loader, none (load once) with another loader.
    freeze_heap : bool
        Once the model is loaded, exempt everything alive from garbage collection (``gc.freeze``):
        for a process that runs this one app (``fedseg serve``); objects frozen there are never
        collected as cycles, so a process that builds many apps (tests) leaves it off.
    """
    settings = settings or ServingSettings()
    metrics = ServingMetrics()  # per app: never prometheus-client's global registry
    metrics.drift = DriftMonitor(window=settings.drift_window, threshold=settings.drift_threshold,
                                 min_requests=settings.drift_min_requests)
    metrics.register(DriftCollector(metrics.drift))
    if resolver is None and loader is registry_loader:
        resolver = registry_resolver
    loader = recording_references(loader, metrics.drift)  # each loaded version's input_reference
    # every model's forward on one thread: one OpenMP team, forwards serialised (see Predictor)
    runner = ThreadPoolExecutor(1, thread_name_prefix="fedseg-forward")
    models = _manager(settings, loader, resolver, runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(models.load)  # off the event loop
        if freeze_heap:
            await run_in_threadpool(_freeze_heap)
        models.start()  # follow the registry
        jobs.start()  # run /v1/jobs (queued ones from before a restart too)
        try:
            yield
        finally:
            await run_in_threadpool(jobs.stop)
            await run_in_threadpool(models.stop)
            runner.shutdown(wait=False)

    app = FastAPI(
        title="fedseg",
        summary="Lesion segmentation and triage of DICOM series with the federated U-Net.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = models
    jobs = JobService(settings, models=models, ready=lambda: models.champion.predictor is not None,
                      metrics=metrics)  # durable queue under $FEDSEG_HOME/serving
    app.state.jobs = jobs
    app.state.model = models.champion  # the champion's state (readiness)
    app.state.metrics, app.state.drift = metrics, metrics.drift
    install_security(app, settings)  # body limit, auth, audit (inside the metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(metrics_router)
    app.include_router(drift_router)
    app.include_router(ui_router)
    app.include_router(health_router)
    app.include_router(oip_health_router)
    app.include_router(models_router)
    app.include_router(infer_router)
    app.include_router(models_admin_router)
    app.include_router(predict_router)
    app.include_router(triage_router)
    app.include_router(jobs_router)
    return app
