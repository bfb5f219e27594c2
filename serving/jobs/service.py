"""The queue and the workers of one app, wired to its models and settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from imaging.home import fedseg_home

from ..inference import Segmenter
from ..metrics import ServingMetrics, set_queue_depth
from ..outputs import target_from_settings
from ..settings import ServingSettings
from ..uploads import UploadedFile
from .runner import run_job
from .store import Job, JobStore
from .workers import JobWorkers

__all__ = ["JobService", "default_jobs_root"]


def default_jobs_root() -> Path:
    """``$FEDSEG_HOME/serving`` (holds ``jobs.db`` and ``jobs/<id>/``)."""
    return fedseg_home() / "serving"


class JobService:
    """The store and the workers of one app.

    Parameters
    ----------
    settings : ServingSettings
        ``jobs_workers``, ``jobs_lease_s``, ``jobs_max_attempts`` and the STOW target.
    models : Segmenter
        Routes each series to a version (:class:`serving.models.ModelManager`).
    ready : callable
        Whether a model is loaded (workers claim nothing until it is).
    metrics : ServingMetrics, optional
    root : Path, optional
        Default :func:`default_jobs_root`.
    """

    def __init__(
        self,
        settings: ServingSettings,
        *,
        models: Segmenter,
        ready: Callable[[], bool],
        metrics: ServingMetrics | None = None,
        root: Path | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = JobStore(
            root or default_jobs_root(),
            lease_s=settings.jobs_lease_s,
            max_attempts=settings.jobs_max_attempts,
        )
        self.workers = JobWorkers(
            self.store, self.execute, threads=settings.jobs_workers, ready=ready, metrics=metrics
        )

    def start(self) -> None:
        """Publish the queue depth and start the workers (they also pick up what a previous
        process left queued, or running with an expired lease)."""
        set_queue_depth(self.store.depth())
        self.workers.start()

    def stop(self) -> None:
        """Stop the workers after the jobs they are running."""
        self.workers.stop()

    def execute(self, job: Job) -> dict[str, Any]:
        """Run one claimed job (called by the workers)."""
        target = target_from_settings(self.settings) if job.options.get("store") else None
        inputs = [replace(f, checked=True) for f in self.store.inputs(job.id)]  # checked when submitted
        return run_job(self.models, inputs, job_id=job.id, target=target)

    def submit(
        self, files: Sequence[UploadedFile], options: Mapping[str, Any], key: str | None
    ) -> tuple[Job, bool]:
        """Queue a job (see :meth:`JobStore.submit`) and wake the workers."""
        job, created = self.store.submit(files, options, key)
        if created:
            self.workers.wake()
            set_queue_depth(self.store.depth())
        return job, created
