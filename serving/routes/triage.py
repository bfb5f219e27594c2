"""``/v1/triage``: is this series suspect? The score without the mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from imaging.errors import ImagingError

from ..deps import ModelsDep, SettingsDep
from ..errors import ServingError
from ..inference import Segmenter, analyse
from ..uploads import DicomLimits, UploadedFile, limits_of, read_uploads
from .predict import (
    _ERRORS,
    MODEL_VERSION_HEADER,
    SERIES_BODY,
    SERVER_TIMING_HEADER,
    http_status,
    server_timing,
)

__all__ = ["router", "TriageResponse"]

router = APIRouter(prefix="/v1", tags=["predict"])


class TriageResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    id: str = Field(description="the series' SeriesInstanceUID")
    status: Literal["suspect", "normal"] = Field(description="suspect when score >= threshold")
    score: float = Field(ge=0.0, le=1.0, description="probability that the series holds a lesion")
    threshold: float = Field(description="the model's triage threshold (its spec's triage_threshold)")
    model_name: str
    model_version: int


def _triage(models: Segmenter, files: Sequence[UploadedFile],
            limits: DicomLimits) -> tuple[TriageResponse, str]:
    analysis = analyse(models, files, limits=limits)  # checks first, in this worker thread
    return TriageResponse(
        id=analysis.volume.series_uid,
        status=analysis.prediction.status,
        score=analysis.prediction.score,
        threshold=analysis.triage_threshold,
        model_name=analysis.model_name,
        model_version=analysis.model_version,
    ), server_timing(analysis.timings)


@router.post("/triage", response_model=TriageResponse, responses=_ERRORS, openapi_extra=SERIES_BODY)
async def triage(
    request: Request, response: Response, models: ModelsDep, settings: SettingsDep
) -> TriageResponse:
    """Triage one series: ``suspect`` or ``normal`` with its score, for work-list ordering.

    Send every instance of one series in the multipart field ``files`` (as for ``/v1/predict``).
    The status uses the served model's own threshold (``triage_threshold`` of its spec).
    """
    try:
        models.champion.require()  # 503 before reading the upload
        files = await read_uploads(  # DICOM checks in _triage's thread, before any decoding
            request, max_bytes=settings.max_upload_bytes, max_files=settings.max_instances,
            check=False,
        )
        result, timing = await run_in_threadpool(_triage, models, files, limits_of(request))
    except (ServingError, ImagingError) as exc:
        code = http_status(exc)
        if code is None:  # pragma: no cover - every listed base has a code
            raise
        raise HTTPException(code, detail=str(exc)) from exc
    response.headers[MODEL_VERSION_HEADER] = str(result.model_version)
    response.headers[SERVER_TIMING_HEADER] = timing
    return result
