"""Retrying a round in which fewer than ``min_sites`` sites answered.

Flower aggregates whatever replies arrive before the round's timeout. A site may die in the
middle of a round; if too few answer, :class:`RoundRetryStrategy` asks again (fresh node
sampling, same global weights) up to ``retries`` times, then stops the run with an error that
names the shortfall. Replies that arrive but fail validation do not cause a retry: asking a
misbehaving site again does not help.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .delegating import DelegatingStrategy
from .errors import AggregationError

__all__ = ["RoundRetryStrategy", "RoundBelowMinimumError"]

log = logging.getLogger("fedseg.aggregation")


class RoundBelowMinimumError(AggregationError):
    """A round kept getting fewer answers than ``min_sites``."""


class RoundRetryStrategy(DelegatingStrategy):
    """Delegates to ``inner``; re-sends a train round that got fewer than ``min_sites`` answers."""

    def __init__(self, inner: Strategy, min_sites: int, retries: int, timeout: float) -> None:
        if min_sites < 1 or retries < 0 or timeout <= 0:
            raise ValueError("min_sites must be >= 1, retries >= 0 and timeout > 0")
        self.inner, self.min_sites, self.retries, self.timeout = inner, min_sites, retries, timeout
        self._sent: tuple[ArrayRecord, ConfigRecord, Grid] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = (arrays, config, grid)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        attempt = 1
        while _answered(replies) < self.min_sites:
            if attempt > self.retries or self._sent is None:
                raise RoundBelowMinimumError(
                    f"round {server_round}: {_answered(replies)} site(s) answered, min-sites is "
                    f"{self.min_sites}, after {attempt} attempt(s) (round-retries={self.retries}); "
                    f"{_failures(replies)}"
                )
            attempt += 1
            log.warning("round %d: %d site(s) answered, min-sites is %d; attempt %d of %d",
                        server_round, _answered(replies), self.min_sites, attempt, self.retries + 1)
            arrays, config, grid = self._sent
            replies = list(grid.send_and_receive(
                self.inner.configure_train(server_round, arrays, config, grid), timeout=self.timeout
            ))
        return self.inner.aggregate_train(server_round, replies)


def _answered(replies: list[Message]) -> int:
    return sum(1 for r in replies if not r.has_error())


def _failures(replies: list[Message]) -> str:
    errors = [r.error.reason for r in replies if r.has_error()]
    return "errors: " + "; ".join(errors) if errors else "no error replies (sites timed out)"
