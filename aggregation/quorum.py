"""Waiting for enough sites with a deadline, instead of Flower's endless wait.

Flower's strategies sample nodes with ``sample_nodes``, which blocks until ``min_available_nodes``
are connected, forever. This wrapper waits at most ``join_timeout`` seconds before each round
and stops the run with an error that names the shortfall.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .delegating import DelegatingStrategy
from .errors import AggregationError

__all__ = ["QuorumStrategy", "QuorumNotReachedError"]


class QuorumNotReachedError(AggregationError):
    """Fewer sites than the minimum were connected when a round had to start."""


class QuorumStrategy(DelegatingStrategy):
    """Delegates to ``inner`` once at least ``min_sites`` nodes are connected."""

    def __init__(self, inner: Strategy, min_sites: int, join_timeout: float,
                 poll_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if min_sites < 1 or join_timeout <= 0:
            raise ValueError("min_sites must be >= 1 and join_timeout > 0")
        self.inner, self.min_sites, self.join_timeout = inner, min_sites, join_timeout
        self.poll_seconds, self.clock = poll_seconds, clock

    def _wait(self, grid: Grid, server_round: int, phase: str) -> None:
        deadline = self.clock() + self.join_timeout
        while True:
            connected = len(list(grid.get_node_ids()))
            if connected >= self.min_sites:
                return
            if self.clock() >= deadline:
                raise QuorumNotReachedError(
                    f"round {server_round} ({phase}): {connected} site(s) connected, min-sites is "
                    f"{self.min_sites}; waited {self.join_timeout:.0f} s (join-timeout)"
                )
            time.sleep(self.poll_seconds)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait(grid, server_round, "train")
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait(grid, server_round, "evaluate")
        return self.inner.configure_evaluate(server_round, arrays, config, grid)
