"""fedseg serving: the FastAPI service that segments and triages uploaded DICOM series.

Imports only :mod:`imaging` and :mod:`registry` (never flwr or opacus).
"""

from .app import ModelLoader, create_app, registry_loader
from .errors import (
    EmptyUploadError,
    MalformedUploadError,
    ModelNotReadyError,
    NotDicomError,
    NotMultipartError,
    ServingError,
    TooManyInstancesError,
    UploadError,
    UploadTooLargeError,
)
from .models import ModelManager, registry_resolver
from .predictor import Prediction, Predictor, triage_score
from .rle import rle_decode, rle_encode
from .settings import ServingSettings

__all__ = [
    "create_app",
    "registry_loader",
    "ModelLoader",
    "ModelManager",
    "registry_resolver",
    "ServingSettings",
    "Predictor",
    "Prediction",
    "triage_score",
    "rle_encode",
    "rle_decode",
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
