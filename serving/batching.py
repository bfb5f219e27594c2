"""Micro-batching: concurrent requests to one model share a forward pass.

A :class:`MicroBatcher` sits in front of a model's forward function. Each request hands it the
preprocessed slices of one series, from a worker thread (:meth:`MicroBatcher.run_timed`, which
blocks) or from the event loop (:meth:`MicroBatcher.run_async`, which awaits), and gets its
probabilities back. The forward's own thread (``executor``'s single thread) is the collector:
when work arrives and no batch is being gathered, it is handed a *drain*, which takes what is
pending, runs one forward for all of it, hands every request its share, and goes on while
requests are pending; requests that arrive meanwhile form the next batch. A request thus costs
two thread hand-offs, to the forward thread and back, whichever side it comes from.

The collector waits for more work only while a request has announced itself
(:meth:`MicroBatcher.ticket`, taken before preprocessing) but not yet arrived, and never longer
than ``max_wait_s`` after the oldest pending request arrived: a lone request pays no wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchStats", "MicroBatcher", "Ticket"]

Forward = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BatchStats:
    """Counters of one batcher.

    Attributes
    ----------
    forwards : int
        Forward calls made (one per micro-batch).
    requests : int
        Requests served.
    slices : int
        Slices forwarded.
    largest : int
        Most requests served by one forward.
    """

    forwards: int = 0
    requests: int = 0
    slices: int = 0
    largest: int = 0


class Ticket:
    """A request's announcement that it will call :meth:`MicroBatcher.run_timed` soon."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


class _Item:
    """One request's slices and, once its batch ran, its outcome; ``notify`` tells the caller."""

    __slots__ = ("images", "arrived", "result", "seconds", "error", "notify")

    def __init__(self, images: np.ndarray, notify: Callable[[], None]) -> None:
        self.images = images
        self.arrived = time.monotonic()
        self.result: np.ndarray | None = None
        self.seconds = 0.0  # the forward of this item's batch
        self.error: BaseException | None = None
        self.notify = notify

    def outcome(self) -> tuple[np.ndarray, float]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result, self.seconds


class MicroBatcher:
    """Run ``forward`` on the concatenated slices of concurrent requests.

    Parameters
    ----------
    forward : callable
        ``(n, S, S) float32 -> (n, S, S)``: the model's forward on preprocessed slices. Always
        called on ``executor``'s thread, one batch at a time.
    executor : concurrent.futures.Executor, optional
        A single-thread executor: the forward's thread (default: one of the batcher's own). Others
        (another model's batcher) may share it.
    max_slices : int
        Most slices in one batch; a request larger than this still runs, alone.
    max_wait_s : float
        Longest time the oldest pending request waits for announced ones to join.
    on_batch : callable, optional
        ``(seconds, requests, slices) -> None`` after every forward (metrics).
    """

    def __init__(
        self,
        forward: Forward,
        *,
        executor: Executor | None = None,
        max_slices: int = 64,
        max_wait_s: float = 0.002,
        on_batch: Callable[[float, int, int], None] | None = None,
    ) -> None:
        if max_slices < 1:
            raise ValueError(f"max_slices must be positive, got {max_slices}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be non-negative, got {max_wait_s}")
        self._forward = forward
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="fedseg-forward")
        self.max_slices = max_slices
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: deque[_Item] = deque()
        self._coming = 0  # announced, not yet arrived
        self._draining = False  # a drain is queued on, or running on, the forward thread
        self._stats = BatchStats()

    @property
    def stats(self) -> BatchStats:
        """Counters so far."""
        with self._cond:
            return self._stats

    @property
    def waiting(self) -> int:
        """Requests queued for the next forward."""
        with self._cond:
            return len(self._pending)

    @contextmanager
    def ticket(self) -> Iterator[Ticket]:
        """Announce a request (before its preprocessing) so that the collector may wait for it."""
        ticket = Ticket()
        with self._cond:
            self._coming += 1
        try:
            yield ticket
        finally:
            with self._cond:
                if not ticket.used:  # left without running (preprocessing failed)
                    ticket.used = True
                    self._coming -= 1
                    self._cond.notify_all()

    def run(self, images: np.ndarray, ticket: Ticket | None = None) -> np.ndarray:
        """The forward's output for ``images``, computed in a batch with concurrent requests.

        Blocks; raises whatever the forward raised for the batch this request was in.
        """
        return self.run_timed(images, ticket)[0]

    def run_timed(self, images: np.ndarray,
                  ticket: Ticket | None = None) -> tuple[np.ndarray, float]:
        """:meth:`run`, and the seconds of the forward that computed it (its batch's)."""
        done = threading.Event()
        item = _Item(images, done.set)
        self._put(item, ticket)
        done.wait()
        return item.outcome()

    async def run_async(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """:meth:`run_timed` for the event loop: awaits the batch instead of blocking."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():  # the awaiting request may have been cancelled
                future.set_result(None)

        def notify() -> None:  # on the forward thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits this any more
                loop.call_soon_threadsafe(settle)

        item = _Item(images, notify)
        self._put(item, None)
        await future
        return item.outcome()

    def _put(self, item: _Item, ticket: Ticket | None) -> None:
        """Queue ``item``; hand the forward thread a drain unless one is on its way."""
        with self._cond:
            if ticket is not None and not ticket.used:
                ticket.used = True
                self._coming -= 1
            self._pending.append(item)
            self._cond.notify_all()  # a collector waiting for announced requests
            if self._draining:
                return
            self._draining = True
        try:  # in this request's context: ``on_batch`` finds what the request sees (its metrics)
            self._executor.submit(contextvars.copy_context().run, self._drain)
        except RuntimeError as exc:  # the executor was shut down: the service is stopping
            self._fail_pending(exc)

    def _drain(self) -> None:
        """On the forward thread: forward batches until nothing is pending."""
        try:
            while True:
                with self._cond:
                    if not self._pending:
                        self._draining = False
                        return
                    batch = self._gather()
                self._run_batch(batch)
        except BaseException as exc:  # pragma: no cover - a bug here must not strand requests
            self._fail_pending(exc)
            raise

    def _fail_pending(self, exc: BaseException) -> None:
        with self._cond:
            failed = list(self._pending)
            self._pending.clear()
            self._draining = False
        for item in failed:
            item.error = exc
            item.notify()

    def _gather(self) -> list[_Item]:
        """Wait (lock held) for announced requests, then take a batch from the queue's head."""
        deadline = self._pending[0].arrived + self.max_wait_s
        while self._coming > 0 and self._pending_slices() < self.max_slices:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        batch = [self._pending.popleft()]
        size = len(batch[0].images)
        while self._pending and size + len(self._pending[0].images) <= self.max_slices:
            size += len(self._pending[0].images)
            batch.append(self._pending.popleft())
        return batch

    def _pending_slices(self) -> int:
        return sum(len(i.images) for i in self._pending)

    def _run_batch(self, batch: list[_Item]) -> None:
        """Forward ``batch`` (lock released) and hand every request its share."""
        start = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([i.images for i in batch])
            out = self._forward(images)
            offset = 0
            for i in batch:
                i.result = out[offset : offset + len(i.images)]
                offset += len(i.images)
        except BaseException as exc:  # every request of the batch gets the forward's error
            for i in batch:
                i.error = exc
        seconds = time.perf_counter() - start
        slices = sum(len(i.images) for i in batch)
        with self._cond:
            s = self._stats
            self._stats = BatchStats(
                s.forwards + 1, s.requests + len(batch), s.slices + slices, max(s.largest, len(batch))
            )
        for i in batch:
            i.seconds = seconds
            i.notify()
        if self._on_batch is not None:
            self._on_batch(seconds, len(batch), slices)
