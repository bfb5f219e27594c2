"""Asynchronous jobs: ``POST /v1/jobs`` queues series, worker threads segment them.

The queue is durable (:class:`JobStore`, sqlite in WAL mode under ``$FEDSEG_HOME/serving``): a
restarted service finishes what was queued, and a job whose worker died is run again once its
lease expires, while a finished job is never run again.
"""

from .errors import BadIdempotencyKeyError, IdempotencyConflictError, JobError, JobNotFoundError
from .runner import group_by_series, run_job
from .service import JobService, default_jobs_root
from .store import Job, JobStatus, JobStore
from .workers import JobWorkers

__all__ = [
    "Job",
    "JobStatus",
    "JobStore",
    "JobWorkers",
    "JobService",
    "JobError",
    "JobNotFoundError",
    "IdempotencyConflictError",
    "BadIdempotencyKeyError",
    "group_by_series",
    "run_job",
    "default_jobs_root",
]
