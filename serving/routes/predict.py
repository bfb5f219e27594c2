"""``/v1/predict``: segment and triage one uploaded DICOM series.

This is the only place where :mod:`imaging.errors` and :mod:`serving.errors` become HTTP status
codes (see :func:`http_status`). Bad input is never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from imaging.dicom_read import read_series
from imaging.errors import ImagingError, SeriesError, UnsupportedTransferSyntaxError

from ..deps import PredictorDep, SettingsDep
from ..errors import (
    EmptyUploadError,
    MalformedUploadError,
    ModelNotReadyError,
    NotDicomError,
    NotMultipartError,
    ServingError,
    TooManyInstancesError,
    UploadTooLargeError,
)
from ..predictor import Predictor
from ..rle import rle_encode
from ..schemas import ErrorResponse, PredictResponse, RleMask
from ..uploads import FILES_FIELD, UploadedFile, check_dicom, read_uploads

__all__ = ["router", "http_status", "MODEL_VERSION_HEADER"]

MODEL_VERSION_HEADER = "X-Model-Version"

router = APIRouter(prefix="/v1", tags=["predict"])

# Most specific first: UnsupportedTransferSyntaxError is a DicomReadError, NotDicomError an UploadError.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ModelNotReadyError, status.HTTP_503_SERVICE_UNAVAILABLE),
    (UploadTooLargeError, status.HTTP_413_CONTENT_TOO_LARGE),
    (TooManyInstancesError, status.HTTP_413_CONTENT_TOO_LARGE),
    (NotMultipartError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (NotDicomError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (UnsupportedTransferSyntaxError, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
    (MalformedUploadError, status.HTTP_400_BAD_REQUEST),
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


def _infer(predictor: Predictor, files: Sequence[UploadedFile]) -> PredictResponse:
    """Blocking part of a request: read, check, predict, encode (runs in the threadpool)."""
    check_dicom(files)
    volume = read_series([f.open() for f in files])
    prediction = predictor.predict(volume)
    return PredictResponse(
        model_name=predictor.name,
        model_version=predictor.version,
        series_instance_uid=volume.series_uid,
        score=prediction.score,
        status=prediction.status,
        mask=RleMask(shape=list(prediction.mask.shape), rle=rle_encode(prediction.mask)),
    )


_ERRORS = {
    code: {"model": ErrorResponse}
    for code in (400, 413, 415, 422, 503)
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILES_FIELD],
                        "properties": {
                            FILES_FIELD: {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "the DICOM instances of one series",
                            }
                        },
                    }
                }
            },
        }
    },
)
async def predict(
    request: Request, response: Response, predictor: PredictorDep, settings: SettingsDep
) -> PredictResponse:
    """Segment one series and say whether it looks suspect.

    Send every instance of one series (single-frame DICOM) in the multipart field ``files``.
    The mask comes back run-length encoded in the series' own ``[slices, rows, cols]`` geometry,
    slices ordered along the slice normal.
    """
    try:
        files = await read_uploads(
            request, max_bytes=settings.max_upload_bytes, max_files=settings.max_instances
        )
        result = await run_in_threadpool(_infer, predictor, files)
    except (ServingError, ImagingError) as exc:
        code = http_status(exc)
        if code is None:  # pragma: no cover - every listed base has a code
            raise
        raise HTTPException(code, detail=str(exc)) from exc
    response.headers[MODEL_VERSION_HEADER] = str(predictor.version)
    return result
