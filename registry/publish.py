"""Publishing a global model: weights, spec, metrics and lineage as a registry version."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from imaging.spec import ModelSpec

from .artifacts import PYFUNC_SCRIPT, SPEC_FILE, STATE_FILE
from .store import RegistryStore
from .tracking import TrackingRun

__all__ = ["PublishedVersion", "publish_model", "promote_if_better", "CHAMPION", "METRIC_PREFIX"]

CHAMPION = "champion"
METRIC_PREFIX = "metric."
DECISION_METRIC = "dice_pooled"


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: int
    promoted: bool
    reason: str


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the serialized weights, recorded as lineage."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _signature(spec: ModelSpec) -> ModelSignature:
    shape = (-1, 1, spec.image_size, spec.image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
    )


def publish_model(
    store: RegistryStore,
    run: TrackingRun,
    name: str,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    metrics: Mapping[str, float],
    lineage: Mapping[str, str],
) -> PublishedVersion:
    """Log the model under the run, register a new version, and promote it if it is better."""
    client = store.client()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmpdir / STATE_FILE)
        (tmpdir / SPEC_FILE).write_text(spec.to_json())
        model_dir = tmpdir / "model"
        with warnings.catch_warnings():  # no input example by design: inputs are (N, 1, S, S) tensors
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                python_model=str(PYFUNC_SCRIPT),
                artifacts={"state_dict": str(tmpdir / STATE_FILE), "spec": str(tmpdir / SPEC_FILE)},
                signature=_signature(spec),
                pip_requirements=["fedseg", "torch", "monai"],
            )
        client.log_artifacts(run.run_id, str(model_dir), "model")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="fedseg federated U-Net")
    tags = {**lineage, "weights_sha256": state_digest(state)}
    tags.update({f"{METRIC_PREFIX}{k}": f"{float(v):.6g}" for k, v in metrics.items()})
    version = client.create_model_version(
        name, source=f"{run.artifact_uri}/model", run_id=run.run_id, tags=tags
    )
    promoted, reason = promote_if_better(store, name, int(version.version), metrics)
    return PublishedVersion(name, int(version.version), promoted, reason)


def promote_if_better(
    store: RegistryStore, name: str, version: int, metrics: Mapping[str, float]
) -> tuple[bool, str]:
    """Alias ``champion`` to ``version`` when none exists or when it beats the champion."""
    client = store.client()
    new_score = metrics.get(DECISION_METRIC)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        return True, "no champion yet"
    old_raw = current.tags.get(f"{METRIC_PREFIX}{DECISION_METRIC}")
    if new_score is None:
        return False, f"version {version} has no {DECISION_METRIC}; champion stays {current.version}"
    if old_raw is None or float(new_score) > float(old_raw):
        client.set_registered_model_alias(name, CHAMPION, str(version))
        return True, f"{DECISION_METRIC} {float(new_score):.4f} beats champion v{current.version} ({old_raw})"
    return False, (
        f"{DECISION_METRIC} {float(new_score):.4f} does not beat champion "
        f"v{current.version} ({float(old_raw):.4f})"
    )


def lineage_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
