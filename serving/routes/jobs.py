"""``/v1/jobs``: queue series for segmentation and fetch the results later.

``POST /v1/jobs`` answers ``202 Accepted`` with the job and a ``Location`` once the files are on
disk and the job is in the durable queue. ``Idempotency-Key`` is optional: with it, a retried
request (same files, in any order, and same options) answers ``200`` with the same job instead
of queueing another, and the key with other files or options is a ``409``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from imaging.errors import ImagingError

from ..deps import SettingsDep
from ..errors import ServingError
from ..jobs import (
    BadIdempotencyKeyError,
    IdempotencyConflictError,
    Job,
    JobNotFoundError,
    JobService,
    group_by_series,
)
from ..outputs import target_from_settings
from ..schemas import ErrorResponse, PredictResponse
from ..uploads import read_uploads
from .predict import STORE_QUERY, http_status, multipart_files_body

__all__ = ["router", "JobResponse", "JobResult", "IDEMPOTENCY_HEADER"]

IDEMPOTENCY_HEADER = "Idempotency-Key"

router = APIRouter(prefix="/v1", tags=["jobs"])


class JobResult(BaseModel):
    series: list[PredictResponse] = Field(description="one result per series, in upload order")


class JobResponse(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    attempts: int = Field(description="how many times a worker started it")
    created_at: datetime
    updated_at: datetime
    result: JobResult | None = Field(default=None, description="present when done")
    error: str | None = Field(default=None, description="present when failed: why")

    @classmethod
    def of(cls, job: Job) -> JobResponse:
        return cls(
            id=job.id,
            status=job.status,
            attempts=job.attempts,
            created_at=datetime.fromtimestamp(job.created_at, UTC),
            updated_at=datetime.fromtimestamp(job.updated_at, UTC),
            result=JobResult.model_validate(job.result) if job.result is not None else None,
            error=job.error,
        )


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


def _http(exc: Exception) -> HTTPException:
    if isinstance(exc, JobNotFoundError):
        code = status.HTTP_404_NOT_FOUND
    elif isinstance(exc, IdempotencyConflictError):
        code = status.HTTP_409_CONFLICT
    elif isinstance(exc, BadIdempotencyKeyError):
        code = status.HTTP_400_BAD_REQUEST
    else:
        code = http_status(exc) or status.HTTP_500_INTERNAL_SERVER_ERROR
    return HTTPException(code, detail=str(exc))


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 409, 413, 415, 422)}
_BODY = multipart_files_body("the DICOM instances of one or more series")


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobResponse,
    response_model_exclude_none=True,
    responses={200: {"model": JobResponse, "description": "an idempotent replay"}, **_ERRORS},
    openapi_extra=_BODY,
)
async def submit_job(
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: bool = STORE_QUERY,
    idempotency_key: Annotated[
        str | None,
        Header(alias=IDEMPOTENCY_HEADER, description="optional; makes retries safe (same key, same job)"),
    ] = None,
) -> JobResponse:
    """Queue the instances of one or more series; poll ``Location`` for the result.

    The files are checked (DICOM headers) and stored before the answer; a worker then segments
    each series as ``/v1/predict`` would (``?store=true`` also stores each SEG in the PACS).
    """
    jobs = _jobs(request)
    try:
        if store:
            target_from_settings(settings)  # refuse now, not in the worker
        files = await read_uploads(
            request, max_bytes=settings.max_upload_bytes, max_files=settings.max_instances
        )
        await run_in_threadpool(group_by_series, files)  # every file a DICOM header
        job, created = await run_in_threadpool(jobs.submit, files, {"store": store}, idempotency_key)
    except (ServingError, ImagingError) as exc:
        raise _http(exc) from exc
    location = str(request.url_for("get_job", job_id=job.id).path)
    response.headers["Location"] = location
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobResponse.of(job)


@router.get(
    "/jobs/{job_id}",
    response_model=JobResponse,
    response_model_exclude_none=True,  # "result" when done, "error" when failed
    responses={404: {"model": ErrorResponse}},
)
async def get_job(request: Request, job_id: str) -> JobResponse:
    """A job's status (``queued``, ``running``, ``done``, ``failed``) and, when done, its result."""
    try:
        job = await run_in_threadpool(_jobs(request).store.get, job_id)
    except JobNotFoundError as exc:
        raise _http(exc) from exc
    return JobResponse.of(job)
