"""Loading a registered version for serving: its weights, spec and metadata."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException

from imaging.errors import ConfigError
from imaging.spec import ModelSpec

from .errors import ModelArtifactError, ModelNotFoundError
from .publish import METRIC_PREFIX
from .artifacts import SPEC_FILE, STATE_FILE
from .store import RegistryStore
from .uri import parse_model_uri

__all__ = ["LoadedModel", "load_model", "resolve_version"]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def metrics(self) -> dict[str, float]:
        return {
            k[len(METRIC_PREFIX):]: float(v) for k, v in self.tags.items() if k.startswith(METRIC_PREFIX)
        }


def resolve_version(store: RegistryStore, uri: str):  # -> mlflow ModelVersion
    """The ModelVersion a ``models:/`` URI names, or ModelNotFoundError saying what is missing."""
    ref = parse_model_uri(uri)
    client = store.client()
    try:
        if ref.alias is not None:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, str(ref.version))
    except MlflowException as exc:
        raise ModelNotFoundError(f"{ref} is not in the registry at {store.tracking_uri}") from exc


def load_model(store: RegistryStore, uri: str) -> LoadedModel:
    """Download and validate the version's ``state_dict.pt`` and ``spec.json``."""
    version = resolve_version(store, uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, dst_path=tmp, tracking_uri=store.tracking_uri
                )
            )
        except (MlflowException, OSError) as exc:
            raise ModelArtifactError(f"cannot fetch artifacts of {uri}: {exc}") from exc
        state_path = next(local.rglob(STATE_FILE), None)
        spec_path = next(local.rglob(SPEC_FILE), None)
        if state_path is None or spec_path is None:
            raise ModelArtifactError(f"{uri} lacks {STATE_FILE} or {SPEC_FILE}")
        try:
            spec = ModelSpec.from_json(spec_path.read_text())
            state = torch.load(state_path, weights_only=True, map_location="cpu")
        except (ConfigError, RuntimeError, OSError) as exc:
            raise ModelArtifactError(f"{uri} has unreadable weights or spec: {exc}") from exc
    return LoadedModel(
        name=version.name,
        version=int(version.version),
        spec=spec,
        state_dict=state,
        tags=dict(version.tags),
        aliases=tuple(getattr(version, "aliases", ()) or ()),
    )
