"""Open Inference Protocol (v2) tensors: reading an inference request, writing its response.

Two encodings, as KServe and Triton speak them:

- **JSON**: ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data"}], "outputs"}``
  with ``data`` the tensor's values, flat (row-major) or nested;
- **binary data extension**: the ``Inference-Header-Content-Length: N`` header says that the body's
  first N bytes are that JSON, in which an input carries ``"parameters": {"binary_data_size": M}``
  instead of ``data``; its M raw little-endian bytes follow the JSON. The response is binary too
  when the request asks (``"parameters": {"binary_data_output": true}``, or ``binary_data`` on the
  requested output), and then carries the same header.

fedseg's model takes one input, ``slices``: FP32 ``[n, 1, S, S]``, preprocessed slices (intensity
scaled to [0, 1] and resized to the spec's ``S``), and answers one output, ``probabilities``: FP32
``[n, 1, S, S]``. Everything here is pure (bytes in, arrays out) and raises
:class:`~serving.errors.InferenceRequestError` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import InferenceRequestError, TensorShapeError

__all__ = [
    "HEADER_LENGTH",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "InferRequest",
    "decode_request",
    "encode_response",
]

#: The binary data extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "inference-header-content-length"
INPUT_NAME = "slices"
OUTPUT_NAME = "probabilities"

#: OIP datatypes accepted for ``slices``; all are converted to float32.
_DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "FP64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request.

    Attributes
    ----------
    images : np.ndarray
        float32 ``(n, S, S)``: the ``slices`` input without its channel axis.
    id : str or None
        The request's ``id``, echoed in the response.
    binary_output : bool
        Answer with the binary data extension.
    study : str or None
        ``parameters.study_instance_uid``: routes the request like a study (canary, sticky).
    """

    images: np.ndarray
    id: str | None
    binary_output: bool
    study: str | None


def _header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of the body (parsed) and the binary part after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InferenceRequestError(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 < n <= len(body):
            raise InferenceRequestError(
                f"Inference-Header-Content-Length {n} does not fit the body of {len(body)} bytes"
            )
        json_part, binary = body[:n], body[n:]
    try:
        header = orjson.loads(json_part)  # 5-10x json's speed on a tensor's worth of numbers
    except orjson.JSONDecodeError as exc:
        raise InferenceRequestError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InferenceRequestError("the inference request must be a JSON object")
    return header, binary


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InferenceRequestError(f"{where}'s parameters must be an object")
    return params


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InferenceRequestError(f"input {INPUT_NAME!r}: shape must be a list of non-negative "
                                    f"integers, got {value!r}")
    return tuple(value)


def _values(tensor: dict[str, Any], dtype: np.dtype, count: int, binary: bytes,
            offset: int) -> tuple[np.ndarray, int]:
    """The input's values (flat) and the offset after its binary data."""
    params = _parameters(tensor, f"input {INPUT_NAME!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InferenceRequestError(f"input {INPUT_NAME!r}: binary_data_size must be a "
                                        f"non-negative integer, got {size!r}")
        if size != count * dtype.itemsize:
            raise TensorShapeError(f"input {INPUT_NAME!r}: binary_data_size {size} is not shape "
                                   f"x {dtype.itemsize} bytes = {count * dtype.itemsize}")
        if offset + size > len(binary):
            raise InferenceRequestError(f"input {INPUT_NAME!r}: binary_data_size {size} runs past "
                                        f"the end of the body ({len(binary) - offset} bytes left)")
        return np.frombuffer(binary, dtype=dtype, count=count, offset=offset), offset + size
    if "data" not in tensor:
        raise InferenceRequestError(f"input {INPUT_NAME!r} has neither data nor "
                                    f"parameters.binary_data_size")
    data = tensor["data"]
    try:
        values = np.asarray(data) if isinstance(data, list) else None
    except (TypeError, ValueError):  # ragged nesting
        values = None
    if values is None or (values.size and values.dtype.kind not in "fiu"):
        raise InferenceRequestError(f"input {INPUT_NAME!r}: data must be numbers (a flat or "
                                    f"nested list)")
    values = values.reshape(-1)
    if values.size != count:
        raise TensorShapeError(f"input {INPUT_NAME!r}: data holds {values.size} values, "
                               f"shape needs {count}")
    return values, offset


def decode_request(body: bytes, header_length: str | None, *, image_size: int,
                   max_slices: int) -> InferRequest:
    """Decode an inference request for a model whose slices are ``image_size`` square.

    Raises
    ------
    serving.errors.InferenceRequestError
        The body is not a well-formed OIP request (a 400).
    serving.errors.TensorShapeError
        The input is not ``slices`` FP32 ``[n, 1, S, S]`` with ``1 <= n <= max_slices``, or holds
        a value that is not finite (a 422).
    """
    header, binary = _header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InferenceRequestError(f"the request must have exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise TensorShapeError(f"unknown input {tensor.get('name')!r}; the model takes "
                               f"{INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype not in _DATATYPES:
        raise TensorShapeError(f"input {INPUT_NAME!r}: datatype {datatype!r} is not one of "
                               f"{', '.join(_DATATYPES)}")
    shape = _shape(tensor.get("shape"))
    expected = f"[n, 1, {image_size}, {image_size}]"
    if len(shape) != 4 or shape[1:] != (1, image_size, image_size):
        raise TensorShapeError(f"input {INPUT_NAME!r}: shape {list(shape)} is not {expected}")
    if not 1 <= shape[0] <= max_slices:
        raise TensorShapeError(f"input {INPUT_NAME!r}: {shape[0]} slices; between 1 and "
                               f"{max_slices} per request")
    count = int(np.prod(shape))
    values, end = _values(tensor, _DATATYPES[datatype], count, binary, 0)
    if end != len(binary):
        raise InferenceRequestError(f"{len(binary) - end} bytes follow the inputs' binary data")
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused just below
        images = np.array(values.reshape(shape[0], image_size, image_size), dtype=np.float32)
    if not np.isfinite(images).all():
        raise TensorShapeError(f"input {INPUT_NAME!r} holds NaN or infinite values")
    params = _parameters(header, "the request")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InferenceRequestError("outputs must be a list of objects")
    for out in outputs:
        if out.get("name") != OUTPUT_NAME:
            raise TensorShapeError(f"unknown output {out.get('name')!r}; the model answers "
                                   f"{OUTPUT_NAME!r}")
    binary_output = bool(params.get("binary_data_output")) or any(
        bool(_parameters(o, "an output").get("binary_data")) for o in outputs
    )
    request_id = header.get("id")
    study = params.get("study_instance_uid")
    return InferRequest(
        images=images,
        id=None if request_id is None else str(request_id),
        binary_output=binary_output,
        study=None if study is None else str(study),
    )


def encode_response(request: InferRequest, probabilities: np.ndarray, *, model_name: str,
                    model_version: int) -> tuple[bytes, int | None]:
    """The response body for ``probabilities`` ``(n, S, S)``, and the JSON part's length when
    the body uses the binary data extension (None for plain JSON)."""
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    n, rows, cols = probs.shape
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [n, 1, rows, cols]}
    response: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version),
                                "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if request.binary_output:
        output["parameters"] = {"binary_data_size": probs.nbytes}
        header = orjson.dumps(response)
        return header + probs.tobytes(), len(header)
    output["data"] = probs.reshape(-1)  # float32, written in its shortest exact form
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), None
