"""``/v1/drift``: recent inputs against the served model's training reference."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..drift import DriftMonitor

__all__ = ["router", "DriftResponse", "StatDriftModel"]

router = APIRouter(prefix="/v1", tags=["monitoring"])


class StatDriftModel(BaseModel):
    stat: str = Field(description="intensity_p01/p50/p99, spacing_{slice,row,col}_mm or vendor_unseen")
    reference: float | None = Field(description="the training reference (0 for vendor_unseen)")
    current: float | None = Field(description="mean over the window (share of requests for vendor_unseen)")
    relative_deviation: float | None
    over_threshold: bool


class DriftResponse(BaseModel):
    reference_version: int | None = Field(description="model version whose input_reference is used")
    requests: int = Field(description="requests in the window")
    window: int
    threshold: float
    min_requests: int = Field(description="requests needed before the alert can be raised")
    alert: bool
    stats: list[StatDriftModel]
    vendors: dict[str, int] = Field(description="requests per vendor (Manufacturer) in the window")
    detail: str


@router.get("/drift", response_model=DriftResponse)
def drift(request: Request) -> DriftResponse:
    """Per-statistic relative deviation of the last requests' inputs from the training reference,
    and whether it exceeds ``FEDSEG_SERVE_DRIFT_THRESHOLD``."""
    monitor: DriftMonitor = request.app.state.drift
    return DriftResponse.model_validate(asdict(monitor.report()))
