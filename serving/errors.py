"""The serving package's exception tree.

Every error that :mod:`serving` raises derives from :class:`ServingError`. Routes map these (and
:mod:`imaging.errors`) to HTTP status codes at the edge; nothing below the routes knows about HTTP.
"""

from __future__ import annotations

__all__ = [
    "ServingError",
    "ModelNotReadyError",
    "UploadError",
    "NotMultipartError",
    "MalformedUploadError",
    "EmptyUploadError",
    "NotDicomError",
    "TooManyInstancesError",
    "UploadTooLargeError",
]


class ServingError(Exception):
    """Base class of every error raised by :mod:`serving`."""


class ModelNotReadyError(ServingError):
    """No model is loaded (loading failed or has not finished); the message says why."""


class UploadError(ServingError):
    """A request's upload cannot be used; the message names the problem and, where known, the file."""


class NotMultipartError(UploadError):
    """The request body is not ``multipart/form-data``."""


class MalformedUploadError(UploadError):
    """The multipart body cannot be parsed, or ``files`` holds a non-file value."""


class EmptyUploadError(UploadError):
    """No file was sent in the ``files`` field."""


class NotDicomError(UploadError):
    """An uploaded file is not a DICOM file (the message names it)."""


class TooManyInstancesError(UploadError):
    """More files than ``max_instances`` in one request."""


class UploadTooLargeError(UploadError):
    """The upload is larger than ``max_upload_mb``."""
