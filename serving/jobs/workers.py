"""Threads that claim jobs from a :class:`JobStore`, run them and record the outcome."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from imaging.errors import ImagingError

from ..errors import ServingError
from ..metrics import ServingMetrics, bound, set_queue_depth
from .store import Job, JobStore

__all__ = ["JobWorkers", "Execute"]

log = logging.getLogger(__name__)

#: Runs one job; returns its JSON result. ServingError/ImagingError fail the job with the message.
Execute = Callable[[Job], dict[str, Any]]


class JobWorkers:
    """``threads`` workers over one store.

    Each worker waits until ``ready()`` (the model is loaded), claims a job, renews its lease
    every third of the lease while the job runs, and records the result or the error. A job
    whose worker dies stays ``running`` until its lease expires; then another worker (of this or
    any process sharing the store) claims it again.

    Parameters
    ----------
    store : JobStore
    execute : callable
        ``Job -> result``.
    threads : int
        Number of worker threads (0: none).
    ready : callable
        Whether jobs can run now.
    poll_s : float
        How often an idle worker looks for work (a submission wakes them at once).
    metrics : ServingMetrics, optional
        Bound in the worker threads (queue depth gauge).
    """

    def __init__(
        self,
        store: JobStore,
        execute: Execute,
        *,
        threads: int = 1,
        ready: Callable[[], bool] = lambda: True,
        poll_s: float = 0.5,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.threads = threads
        self.ready = ready
        self.poll_s = poll_s
        self.metrics = metrics
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        """Start the threads (idempotent)."""
        if self._threads:
            return
        self._stop.clear()
        for index in range(self.threads):
            thread = threading.Thread(
                target=self._loop, args=(f"{self._prefix}:{index}",), name=f"fedseg-job-{index}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the threads to stop and wait for the jobs they are running to finish."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def wake(self) -> None:
        """Tell idle workers that a job was submitted."""
        self._wake.set()

    def _idle(self) -> None:
        self._wake.wait(self.poll_s)
        self._wake.clear()

    def _loop(self, owner: str) -> None:
        with bound(self.metrics) if self.metrics is not None else nullcontext():
            while not self._stop.is_set():
                try:
                    job = self.store.claim(owner) if self.ready() else None
                except Exception:  # a locked or unreachable database: try again later
                    log.exception("cannot claim a job")
                    job = None
                if job is None:
                    self._idle()
                    continue
                self._run(job, owner)

    def _run(self, job: Job, owner: str) -> None:
        log.info("job %s: attempt %d by %s", job.id, job.attempts, owner)
        done = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.id, owner, done), daemon=True)
        heartbeat.start()
        try:
            result = self.execute(job)
        except (ServingError, ImagingError) as exc:
            outcome = self.store.fail(job.id, owner, str(exc))
        except Exception as exc:
            log.exception("job %s crashed", job.id)
            outcome = self.store.fail(job.id, owner, f"internal error: {type(exc).__name__}: {exc}")
        else:
            outcome = self.store.complete(job.id, owner, result)
        finally:
            done.set()
            heartbeat.join()
        if not outcome:
            log.warning("job %s: lease lost to another worker; its outcome is theirs", job.id)
        set_queue_depth(self.store.depth())

    def _renew(self, job_id: str, owner: str, done: threading.Event) -> None:
        while not done.wait(self.store.lease_s / 3):
            if not self.store.renew(job_id, owner):
                return
