"""The serving package's exception tree.

Every error that :mod:`serving` raises derives from :class:`ServingError`. Routes map these (and
:mod:`imaging.errors`) to HTTP status codes at the edge; nothing below the routes knows about HTTP.
"""

from __future__ import annotations

__all__ = [
    "ServingError",
    "ModelNotReadyError",
    "ModelLoadError",
    "UploadError",
    "NotMultipartError",
    "MalformedUploadError",
    "EmptyUploadError",
    "NotDicomError",
    "TooManyInstancesError",
    "UploadTooLargeError",
    "PixelBudgetError",
    "DeflateBombError",
    "TransferSyntaxNotAllowedError",
    "InferenceRequestError",
    "TensorShapeError",
    "AuthError",
    "AuthenticationError",
    "PermissionDeniedError",
    "AuthConfigError",
    "ApiKeyStoreError",
]


class ServingError(Exception):
    """Base class of every error raised by :mod:`serving`."""


class ModelNotReadyError(ServingError):
    """No model is loaded (loading failed or has not finished); the message says why."""


class ModelLoadError(ServingError):
    """A model version could not be loaded or warmed up; the one served before stays."""


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


class PixelBudgetError(UploadTooLargeError):
    """The declared pixel data (rows x columns x frames x bits) exceeds ``max_pixel_mb``."""


class DeflateBombError(UploadTooLargeError):
    """A deflated instance inflates to more than the service accepts."""


class TransferSyntaxNotAllowedError(UploadError):
    """An instance's transfer syntax is not on the service's allow-list (or it has no file meta)."""


class InferenceRequestError(ServingError):
    """An Open Inference Protocol request that is not well formed (bad JSON, binary lengths)."""


class TensorShapeError(InferenceRequestError):
    """A well-formed inference request whose tensor the model cannot take (name, datatype,
    shape, non-finite values)."""


class AuthError(ServingError):
    """Base class of authentication and authorisation errors."""


class AuthenticationError(AuthError):
    """No credentials, or credentials that are not valid (HTTP 401)."""


class PermissionDeniedError(AuthError):
    """Valid credentials without the scope a route needs (HTTP 403)."""

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope


class AuthConfigError(AuthError):
    """The auth settings cannot be used (missing or unreadable JWT key, ...)."""


class ApiKeyStoreError(AuthError):
    """The API key store cannot be read or written, or a key name/scope is invalid."""
