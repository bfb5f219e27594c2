"""Where the MLflow tracking store and Model Registry live.

Embedded default: ``sqlite:///$FEDSEG_HOME/mlflow.db`` with artifacts in
``$FEDSEG_HOME/mlartifacts``. A real deployment sets ``FEDSEG_MLFLOW_TRACKING_URI`` (or
``MLFLOW_TRACKING_URI``) to its ``mlflow server``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

# MLflow announces every sqlite schema creation at INFO; fedseg reports what matters itself.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*noload.*")

from imaging.home import fedseg_home

__all__ = ["RegistryStore", "default_store"]


@dataclass(frozen=True)
class RegistryStore:
    tracking_uri: str
    artifact_root: str | None = None  # used when fedseg creates an experiment

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @classmethod
    def embedded(cls, home: Path) -> RegistryStore:
        artifacts = home / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{home / 'mlflow.db'}", artifacts.as_uri())


def default_store() -> RegistryStore:
    """The store named by the environment, else the embedded one under ``$FEDSEG_HOME``."""
    uri = os.environ.get("FEDSEG_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return RegistryStore(uri, os.environ.get("FEDSEG_MLFLOW_ARTIFACT_ROOT") or None)
    return RegistryStore.embedded(fedseg_home())
