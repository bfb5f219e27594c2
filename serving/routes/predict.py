"""``/v1/predict``: segment and triage one uploaded DICOM series.

This is the only place where :mod:`imaging.errors` and :mod:`serving.errors` become HTTP status
codes (see :func:`http_status`). Bad input is never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from imaging.errors import ImagingError, SeriesError, UnsupportedTransferSyntaxError

from ..deps import ModelsDep, SettingsDep
from ..errors import (
    EmptyUploadError,
    InferenceRequestError,
    MalformedUploadError,
    ModelNotReadyError,
    NotDicomError,
    NotMultipartError,
    ServingError,
    TensorShapeError,
    TooManyInstancesError,
    TransferSyntaxNotAllowedError,
    UploadTooLargeError,
)
from ..inference import Segmenter, analyse, to_response
from ..metrics import MODEL_VERSION_HEADER
from ..outputs import (
    SegObject,
    StowError,
    StowNotConfiguredError,
    StowTarget,
    build_seg,
    store_seg,
    target_from_settings,
)
from ..outputs.seg import DICOM_MEDIA_TYPE
from ..schemas import ErrorResponse, PredictResponse
from ..uploads import FILES_FIELD, DicomLimits, UploadedFile, limits_of, read_uploads

__all__ = [
    "router", "http_status", "json_response", "wants_dicom", "server_timing", "MODEL_VERSION_HEADER",
    "SERVER_TIMING_HEADER", "STORE_QUERY",
    "SERIES_BODY",
    "multipart_files_body",
]

router = APIRouter(prefix="/v1", tags=["predict"])

# Most specific first: UnsupportedTransferSyntaxError is a DicomReadError, NotDicomError an UploadError.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ModelNotReadyError, status.HTTP_503_SERVICE_UNAVAILABLE),
    (StowNotConfiguredError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (StowError, status.HTTP_502_BAD_GATEWAY),  # the PACS failed, not the request
    (UploadTooLargeError, status.HTTP_413_CONTENT_TOO_LARGE),
    (TooManyInstancesError, status.HTTP_413_CONTENT_TOO_LARGE),
    (NotMultipartError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (NotDicomError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (UnsupportedTransferSyntaxError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (TransferSyntaxNotAllowedError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (MalformedUploadError, status.HTTP_400_BAD_REQUEST),
    (TensorShapeError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (InferenceRequestError, status.HTTP_400_BAD_REQUEST),
    (EmptyUploadError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (SeriesError, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (ImagingError, status.HTTP_422_UNPROCESSABLE_CONTENT),  # no pixel data, multi-frame, bad values
    (ServingError, status.HTTP_422_UNPROCESSABLE_CONTENT),
)


def http_status(exc: Exception) -> int | None:
    """The status code for an error caused by the request, or None for a server fault."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return None


def wants_dicom(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers ``application/dicom`` (a DICOM SEG) over JSON.

    The highest ``q`` wins; ties and wildcards go to JSON, the default.
    """
    dicom = json = 0.0
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == DICOM_MEDIA_TYPE:
            dicom = max(dicom, q)
        elif media in ("application/json", "application/*", "*/*"):
            json = max(json, q)
    return dicom > 0 and dicom > json


def _infer(
    models: Segmenter, files: Sequence[UploadedFile], limits: DicomLimits, *, dicom: bool,
    target: StowTarget | None,
) -> tuple[PredictResponse, SegObject | None, bytes | None, str]:
    """Blocking part of a request: check, read, predict, encode, SEG and STOW (one worker thread).

    The DICOM checks (:func:`serving.uploads.check_dicom`, under ``limits``) run here, before
    any pixel is decoded, so that a request costs one thread hop; so does the JSON encoding.
    """
    analysis = analyse(models, files, limits=limits)
    result = to_response(analysis)
    seg = build_seg(analysis) if dicom or target is not None else None
    if seg is not None and target is not None:
        result.stored = store_seg(seg, target)
    body = None if dicom and seg is not None else result.model_dump_json(exclude_none=True).encode()
    return result, seg, body, server_timing(analysis.timings)


SERVER_TIMING_HEADER = "Server-Timing"


def server_timing(timings: dict[str, float]) -> str:
    """A ``Server-Timing`` header value (W3C; milliseconds) for stage -> seconds, e.g.
    ``read;dur=12.1, preprocess;dur=5.0, forward;dur=4.2, postprocess;dur=3.9``. ``forward`` is
    the micro-batch's forward, shared with the requests batched together."""
    return ", ".join(f"{stage};dur={1000 * seconds:.2f}" for stage, seconds in timings.items())


def json_response(body: bytes, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer already encoded (by pydantic, off the event loop): FastAPI does not validate
    and re-encode a returned :class:`Response`, which costs milliseconds for a long RLE mask."""
    return Response(body, media_type="application/json", headers=headers)


_ERRORS = {
    code: {"model": ErrorResponse}
    for code in (400, 413, 415, 422, 502, 503)
}

def multipart_files_body(description: str) -> dict:
    """The OpenAPI request body of a route that takes DICOM instances as multipart ``files``."""
    files = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": description}
    schema = {"type": "object", "required": [FILES_FIELD], "properties": {FILES_FIELD: files}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


#: The request body of the routes that take one series (OpenAPI).
SERIES_BODY: dict = multipart_files_body("the DICOM instances of one series")

#: ``?store=true``: also store the SEG in the PACS (STOW-RS to ``FEDSEG_SERVE_STOW_URL``).
STORE_QUERY = Query(
    False, description="also store the DICOM SEG in the PACS (STOW-RS to FEDSEG_SERVE_STOW_URL)"
)


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,  # "stored" only with ?store=true
    responses={
        200: {"content": {DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
              "description": "JSON, or a DICOM SEG with `Accept: application/dicom`"},
        **_ERRORS,
    },
    openapi_extra=SERIES_BODY,
)
async def predict(
    request: Request,
    models: ModelsDep,
    settings: SettingsDep,
    store: bool = STORE_QUERY,
) -> PredictResponse | Response:
    """Segment one series and say whether it looks suspect.

    Send every instance of one series (single-frame DICOM) in the multipart field ``files``.
    The mask comes back run-length encoded in the series' own ``[slices, rows, cols]`` geometry,
    slices ordered along the slice normal.

    With ``Accept: application/dicom`` the answer is a DICOM SEG (binary, one segment) in the
    series' study, referencing every uploaded instance. With ``?store=true`` the SEG is also
    stored in the PACS (STOW-RS); the JSON then says where (``stored``), a SEG answer in its
    ``Content-Location`` header.
    """
    dicom = wants_dicom(request.headers.get("accept"))
    try:
        models.champion.require()  # 503 before reading the upload
        target = target_from_settings(settings) if store else None
        files = await read_uploads(  # DICOM checks in _infer's thread, before any decoding
            request, max_bytes=settings.max_upload_bytes, max_files=settings.max_instances,
            check=False,
        )
        result, seg, body, timing = await run_in_threadpool(
            _infer, models, files, limits_of(request), dicom=dicom, target=target
        )
    except (ServingError, ImagingError) as exc:
        code = http_status(exc)
        if code is None:  # pragma: no cover - every listed base has a code
            raise
        raise HTTPException(code, detail=str(exc)) from exc
    if dicom and seg is not None:
        headers = {MODEL_VERSION_HEADER: str(result.model_version), SERVER_TIMING_HEADER: timing,
                   "Content-Disposition": f'attachment; filename="{seg.sop_instance_uid}.dcm"'}
        if result.stored is not None:  # where the PACS keeps it (WADO-RS)
            headers["Content-Location"] = (
                f"{result.stored.url}/{seg.study_instance_uid}/series/{seg.series_instance_uid}"
                f"/instances/{seg.sop_instance_uid}"
            )
        return Response(seg.data, media_type=DICOM_MEDIA_TYPE, headers=headers)
    assert body is not None
    return json_response(body, {MODEL_VERSION_HEADER: str(result.model_version),
                                SERVER_TIMING_HEADER: timing})
