"""The MLflow adapter: tracking, publish, load, list."""

from .errors import ModelArtifactError, ModelNotFoundError, ModelUriError, RegistryError
from .listing import list_versions
from .load import LoadedModel, load_model, resolve_version
from .publish import CHAMPION, PublishedVersion, promote_if_better, publish_model
from .store import RegistryStore, default_store
from .tracking import TrackingRun
from .uri import ModelRef, parse_model_uri

__all__ = [
    "RegistryError",
    "ModelUriError",
    "ModelNotFoundError",
    "ModelArtifactError",
    "list_versions",
    "LoadedModel",
    "load_model",
    "resolve_version",
    "CHAMPION",
    "PublishedVersion",
    "promote_if_better",
    "publish_model",
    "RegistryStore",
    "default_store",
    "TrackingRun",
    "ModelRef",
    "parse_model_uri",
]
