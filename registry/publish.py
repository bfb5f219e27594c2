"""Publishing a global model: weights, spec, metrics and lineage as a registry version."""

from __future__ import annotations

import hashlib
import io
import logging
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
from .dossier import log_facts
from .dossier_facts import collect_facts
from .errors import DossierError
from .evidence import sign_evidence
from .signing import load_signing_key, sign_model_dir
from .store import RegistryStore
from .tracking import TrackingRun

__all__ = ["PublishedVersion", "publish_model", "CHAMPION", "METRIC_PREFIX"]

log = logging.getLogger("fedseg.registry")

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


def _free_model_path(client, run_id: str) -> str:
    """``model``, or ``model-2``, ``model-3``... when the run already published one: a second
    publication from the same run must not overwrite the files an earlier version points at."""
    path, n = "model", 1
    while client.list_artifacts(run_id, path):
        n += 1
        path = f"model-{n}"
    return path


def publish_model(
    store: RegistryStore,
    run: TrackingRun,
    name: str,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    metrics: Mapping[str, float],
    lineage: Mapping[str, str],
) -> PublishedVersion:
    """Log the model under the run, register a new version, and promote it if it is better.

    In this order: the model directory is signed and logged; the version is registered with its
    lineage and metric tags; its governance dossier is logged; the evidence binding the name,
    version, run, model files, tags and dossier is signed (:mod:`registry.evidence`); only then
    is it promoted to ``champion``, through the gates (``$FEDSEG_GATES_FILE`` or the defaults).
    A service following the alias never meets a version without evidence.
    """
    from .promotion import auto_promote, default_gates  # here: promotion imports this module

    gates = default_gates()  # a malformed gates file fails before anything is registered
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
        # signed before upload: signature.json travels with the files it covers
        key = load_signing_key()
        signature = sign_model_dir(model_dir, key)
        artifact_path = _free_model_path(client, run.run_id)
        client.log_artifacts(run.run_id, str(model_dir), artifact_path)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="fedseg federated U-Net")
    tags = {**lineage, "weights_sha256": state_digest(state)}
    tags.update({f"{METRIC_PREFIX}{k}": f"{float(v):.6g}" for k, v in metrics.items()})
    tags.update(signature.tags())  # signature.key_fingerprint, signature.digest
    version = client.create_model_version(
        name, source=f"{run.artifact_uri}/{artifact_path}", run_id=run.run_id, tags=tags
    )
    number = int(version.version)
    try:  # the facts were just written by this process: nothing to verify yet
        log_facts(store, collect_facts(store, name, number, verify=False))
    except DossierError as exc:  # the model stands without it; regenerate with `registry dossier`
        log.warning("dossier of %s v%s not logged: %s", name, number, exc)
    # the tags it was created with, so an edit between creation and now does not get signed
    sign_evidence(store, name, number, key, model_signature=signature, tags=tags)
    promoted, reason = auto_promote(store, name, number, gates)
    return PublishedVersion(name, number, promoted, reason)
