"""Errors of the job queue (part of :mod:`serving.errors`' tree)."""

from __future__ import annotations

from ..errors import ServingError

__all__ = ["JobError", "JobNotFoundError", "IdempotencyConflictError", "BadIdempotencyKeyError"]


class JobError(ServingError):
    """Base class of the job queue's errors."""


class JobNotFoundError(JobError):
    """No job has this id."""


class IdempotencyConflictError(JobError):
    """An ``Idempotency-Key`` was reused with a different request (other files or options)."""


class BadIdempotencyKeyError(JobError):
    """An ``Idempotency-Key`` that is empty, too long or not printable ASCII."""
