"""``/v2/models/{name}/infer``: Open Inference Protocol inference on preprocessed slices.

For clients that preprocess themselves, and for serving tools that speak the protocol (KServe,
Triton clients): the ``slices`` tensor in, the ``probabilities`` tensor out, in JSON or with the
binary data extension (see :mod:`serving.tensors`). The forward is micro-batched with the DICOM
routes' requests. No DICOM, so no drift statistics and no triage: ``/v1/predict`` does those.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from ..deps import ModelsDep, SettingsDep
from ..errors import ServingError
from ..metrics import MODEL_VERSION_HEADER
from ..models import ModelManager
from ..predictor import Predictor
from ..schemas import ErrorResponse
from ..tensors import (
    HEADER_LENGTH,
    INPUT_NAME,
    OUTPUT_NAME,
    InferRequest,
    decode_request,
    encode_response,
)
from .predict import SERVER_TIMING_HEADER, http_status, server_timing

__all__ = ["router"]

router = APIRouter(prefix="/v2/models", tags=["inference"])

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": [INPUT_NAME]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                  "description": "[n, 1, S, S], S the model's image size (GET /v2/models/{name})"},
        "datatype": {"type": "string", "enum": ["FP32", "FP16", "FP64"]},
        "data": {"type": "array", "items": {}, "description": "the values, flat or nested"},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
    },
}
_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {
            "binary_data_output": {"type": "boolean"},
            "study_instance_uid": {"type": "string",
                                   "description": "route like this study (canary, sticky)"},
        }},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": [OUTPUT_NAME]},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        }}},
    },
}
_BINARY = {"type": "string", "format": "binary",
           "description": "the JSON request (Inference-Header-Content-Length bytes), then the "
                          "inputs' raw little-endian bytes"}
INFER_BODY: dict = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _REQUEST},
    "application/octet-stream": {"schema": _BINARY},
}}}
_RESPONSES: dict = {
    200: {"description": "the probabilities: JSON, or JSON then raw FP32 bytes when asked for "
                         "binary data (Inference-Header-Content-Length gives the JSON's length)",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
    **{code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 503)},
}


#: Binary bodies up to this size are decoded, and answers encoded, on the event loop (tens of
#: microseconds, less than a hand-off to a worker thread); JSON tensors and larger bodies, which
#: take milliseconds, in the thread pool.
INLINE_BYTES = 1 << 20


def _predictor(models: ModelManager, name: str, version: int | None) -> Predictor:
    """The version named, or the champion; 404 when ``name`` (or that version) is not served."""
    if version is not None:
        predictor = models.served(name, version)
        if predictor is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                detail=f"{name} version {version} is not being served")
        return predictor
    champion = models.champion.require()
    if champion.name != name:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"model {name!r} is not served here (served: {champion.name})")
    return champion


def _decode(models: ModelManager, name: str, version: int | None, body: bytes,
            header_length: str | None, max_slices: int) -> tuple[Predictor, InferRequest]:
    """The request's slices and the version that answers it."""
    predictor = _predictor(models, name, version)
    request = decode_request(body, header_length, image_size=predictor.spec.image_size,
                             max_slices=max_slices)
    if version is None and request.study:
        chosen = models.select(request.study)
        if chosen.spec.image_size == predictor.spec.image_size:  # else the champion answers:
            predictor = chosen  # a challenger of another geometry cannot take these slices
    return predictor, request


def _respond(predictor: Predictor, request: InferRequest, probs: np.ndarray,
             forward_s: float) -> Response:
    data, json_length = encode_response(request, probs, model_name=predictor.name,
                                        model_version=predictor.version)
    headers = {MODEL_VERSION_HEADER: str(predictor.version),
               SERVER_TIMING_HEADER: server_timing({"forward": forward_s})}
    if json_length is None:
        return Response(data, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(json_length)
    return Response(data, media_type="application/octet-stream", headers=headers)


async def _infer(request: Request, models: ModelsDep, settings: SettingsDep, name: str,
                 version: int | None) -> Response:
    try:
        models.champion.require()  # 503 before reading the body
        body = await request.body()  # the body limit (413) applies as it is read
        header_length = request.headers.get(HEADER_LENGTH)
        args = (models, name, version, body, header_length, settings.max_instances)
        if header_length is not None and len(body) <= INLINE_BYTES:
            predictor, decoded = _decode(*args)
        else:
            predictor, decoded = await run_in_threadpool(_decode, *args)
        probs, forward_s = await predictor.infer(decoded.images)
        if decoded.binary_output and probs.nbytes <= INLINE_BYTES:
            return _respond(predictor, decoded, probs, forward_s)
        return await run_in_threadpool(_respond, predictor, decoded, probs, forward_s)
    except ServingError as exc:
        code = http_status(exc)
        if code is None:  # pragma: no cover - ServingError always has a code
            raise
        raise HTTPException(code, detail=str(exc)) from exc


@router.post("/{name}/infer", responses=_RESPONSES, openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, models: ModelsDep,
                settings: SettingsDep) -> Response:
    """Run the model on preprocessed slices (Open Inference Protocol).

    The input ``slices`` is FP32 (FP16 and FP64 are converted) of shape ``[n, 1, S, S]``:
    intensities scaled to [0, 1] between the spec's percentiles and resized to ``S`` (the
    ``shape`` in ``GET /v2/models/{name}``). The output ``probabilities`` has the same shape.
    Send the tensor as JSON ``data`` or, faster, as raw bytes after the JSON with the
    ``Inference-Header-Content-Length`` header; ``"parameters": {"binary_data_output": true}``
    asks for raw bytes back. The champion answers, or the challenger for the canary share of
    ``parameters.study_instance_uid`` when given.
    """
    return await _infer(request, models, settings, name, None)


@router.post("/{name}/versions/{version}/infer", responses=_RESPONSES, openapi_extra=INFER_BODY)
async def infer_version(name: str, version: int, request: Request, models: ModelsDep,
                        settings: SettingsDep) -> Response:
    """Run one served version (champion or challenger) on preprocessed slices; see
    ``POST /v2/models/{name}/infer``."""
    return await _infer(request, models, settings, name, version)
