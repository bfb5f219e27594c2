"""Turning a multipart upload into in-memory DICOM files, within the service's limits."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from imaging.dicom_read import read_header
from imaging.errors import DicomReadError

from .errors import (
    EmptyUploadError,
    MalformedUploadError,
    NotDicomError,
    NotMultipartError,
    TooManyInstancesError,
    UploadTooLargeError,
)

__all__ = ["FILES_FIELD", "UploadedFile", "read_uploads", "check_dicom"]

#: The multipart field that carries the instances.
FILES_FIELD = "files"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UploadedFile:
    """One uploaded file, held in memory."""

    name: str
    data: bytes

    def open(self) -> io.BytesIO:
        """A fresh file-like object whose ``name`` is the upload's file name (for messages)."""
        buffer = io.BytesIO(self.data)
        buffer.name = self.name  # type: ignore[attr-defined]
        return buffer


async def read_uploads(request: Request, *, max_bytes: int, max_files: int) -> list[UploadedFile]:
    """Read the ``files`` field of a multipart request into memory.

    The ``Content-Length`` is checked before parsing; the bytes actually read are counted too
    (for chunked requests). Starlette spools large parts to temporary files while parsing.

    Raises
    ------
    NotMultipartError, MalformedUploadError, EmptyUploadError, TooManyInstancesError,
    UploadTooLargeError
    """
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise NotMultipartError(
            f"send the DICOM instances as multipart/form-data in the field {FILES_FIELD!r}, "
            f"not {content_type or 'a body without Content-Type'}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    try:
        form = await request.form(max_files=max_files)
    except StarletteHTTPException as exc:  # Starlette reports multipart problems as a 400
        detail = str(exc.detail)
        if "too many files" in detail.lower():
            raise TooManyInstancesError(
                f"more than {max_files} files in one request; the limit is {max_files} "
                "instances (FEDSEG_SERVE_MAX_INSTANCES)"
            ) from None
        raise MalformedUploadError(f"the multipart body cannot be parsed: {detail}") from None
    try:
        values = form.getlist(FILES_FIELD)
        if not values:
            others = sorted(set(form.keys()))
            hint = f" (got fields {', '.join(map(repr, others))})" if others else ""
            raise EmptyUploadError(
                f"no files: send the DICOM instances of one series in the multipart field "
                f"{FILES_FIELD!r}{hint}"
            )
        if len(values) > max_files:
            raise TooManyInstancesError(
                f"{len(values)} files in one request; the limit is {max_files} instances "
                "(FEDSEG_SERVE_MAX_INSTANCES)"
            )
        uploads: list[UploadedFile] = []
        total = 0
        for index, value in enumerate(values):
            if not isinstance(value, UploadFile):
                raise MalformedUploadError(
                    f"field {FILES_FIELD!r} item #{index + 1} is text, not a file upload"
                )
            name = value.filename or f"<upload #{index + 1}>"
            chunks: list[bytes] = []
            while chunk := await value.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(total, max_bytes, at_least=True)
                chunks.append(chunk)
            uploads.append(UploadedFile(name, b"".join(chunks)))
        return uploads
    finally:
        await form.close()


def check_dicom(files: Sequence[UploadedFile]) -> None:
    """Raise :class:`NotDicomError` naming the first file that is not DICOM (headers only)."""
    for upload in files:
        if not upload.data:
            raise NotDicomError(f"{upload.name} is empty, not a DICOM file")
        try:
            read_header(upload.open(), name=upload.name)
        except DicomReadError as exc:
            raise NotDicomError(str(exc)) from None


def _too_large(size: int, limit: int, *, at_least: bool = False) -> UploadTooLargeError:
    mib = 1024 * 1024
    amount = f"{'more than ' if at_least else ''}{size / mib:.1f} MiB"
    return UploadTooLargeError(
        f"upload of {amount} exceeds the limit of {limit / mib:.0f} MiB (FEDSEG_SERVE_MAX_UPLOAD_MB)"
    )
