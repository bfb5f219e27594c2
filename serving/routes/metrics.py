"""``/metrics``: the app's Prometheus metrics (see :mod:`serving.metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..metrics import CONTENT_TYPE, ServingMetrics

__all__ = ["router"]

router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format"}},
)
def prometheus_metrics(request: Request) -> Response:
    """Latency per route and per prediction stage, requests by route, status and model version,
    the served model versions, reloads, queue depth and input drift."""
    metrics: ServingMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE)
