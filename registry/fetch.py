"""Downloading what a registered version is made of: its model directory, its run's artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from .errors import ModelArtifactError
from .store import RegistryStore

__all__ = ["MLMODEL_FILE", "download_model_dir", "download_run_dir"]

MLMODEL_FILE = "MLmodel"


def download_model_dir(store: RegistryStore, source: str, dst: Path) -> tuple[Path, bool]:
    """Download a version's ``source`` into ``dst``.

    Returns
    -------
    tuple[Path, bool]
        The directory holding ``MLmodel`` (else the download's root), and whether ``MLmodel``
        was found.

    Raises
    ------
    ModelArtifactError
        The artifacts cannot be fetched.
    """
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(dst), tracking_uri=store.tracking_uri
            )
        )
    except (MlflowException, OSError) as exc:
        raise ModelArtifactError(f"cannot fetch artifacts of {source}: {exc}") from exc
    mlmodel = next(iter(sorted(local.rglob(MLMODEL_FILE))), None)
    return (mlmodel.parent, True) if mlmodel is not None else (local, False)


def download_run_dir(store: RegistryStore, run_id: str, path: str, dst: Path) -> Path | None:
    """Download the artifact directory ``path`` of ``run_id`` into ``dst``; None when it is absent.

    Raises
    ------
    ModelArtifactError
        The run's artifacts cannot be listed or fetched.
    """
    try:
        if not store.client().list_artifacts(run_id, path):
            return None
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=store.tracking_uri
            )
        )
    except (MlflowException, OSError) as exc:
        raise ModelArtifactError(f"cannot fetch {path} of run {run_id}: {exc}") from exc
