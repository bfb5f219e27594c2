"""Experiment tracking for federated runs: params and per-round, per-site metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.time import get_current_time_millis

from .store import RegistryStore

__all__ = ["TrackingRun"]


class TrackingRun:
    """One MLflow run, written through an explicit client (no global MLflow state)."""

    def __init__(self, store: RegistryStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._client = store.client()

    @classmethod
    def start(
        cls, store: RegistryStore, experiment: str, run_name: str, tags: Mapping[str, str]
    ) -> TrackingRun:
        client = store.client()
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=store.artifact_root)
        )
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return cls(store, run.info.run_id)

    @classmethod
    def resume(cls, store: RegistryStore, run_id: str) -> TrackingRun:
        """Reopen ``run_id`` (a coordinator run resumed from its journal) as running."""
        client = store.client()
        client.get_run(run_id)  # raises if the store does not know it
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return cls(store, run_id)

    def log_params(self, params: Mapping[str, object]) -> None:
        batch = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = get_current_time_millis()
        batch = [
            Metric(_metric_key(k), float(v), now, step)
            for k, v in sorted(metrics.items())
            if math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def end(self, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self._client.set_terminated(self.run_id, status=status)

    @property
    def artifact_uri(self) -> str:
        return self._client.get_run(self.run_id).info.artifact_uri


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; anything else becomes _
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
