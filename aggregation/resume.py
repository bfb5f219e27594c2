"""Continuing a run after round ``k`` and announcing every completed round.

Flower's ``Strategy.start`` always counts rounds from 1. :class:`ResumingStrategy` wraps the
whole strategy stack and shifts the round numbers it hands down by ``completed_rounds``, so a
run resumed after round 3 of 10 calls ``start(num_rounds=7)`` and every layer below sees rounds
4..10. After each round's evaluation it calls ``on_round_end(round, arrays, updated)``, the
journal's hook; ``updated`` tells whether the round's aggregation produced new weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .delegating import DelegatingStrategy

__all__ = ["ResumingStrategy", "OnRoundEnd"]

# (server round just completed, the global arrays after it, whether aggregation gave new weights)
OnRoundEnd = Callable[[int, ArrayRecord, bool], None]


class ResumingStrategy(DelegatingStrategy):
    """Delegates to ``inner`` with rounds offset by ``completed_rounds``."""

    def __init__(self, inner: Strategy, on_round_end: OnRoundEnd, completed_rounds: int = 0) -> None:
        if completed_rounds < 0:
            raise ValueError(f"completed_rounds must be >= 0, got {completed_rounds}")
        self.inner, self.on_round_end, self.offset = inner, on_round_end, completed_rounds
        self._arrays: ArrayRecord | None = None  # the global arrays this round evaluates
        self._updated = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, replies)
        self._updated = arrays is not None
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._arrays = arrays
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        summary = self.inner.aggregate_evaluate(server_round + self.offset, replies)
        if self._arrays is not None:
            self.on_round_end(server_round + self.offset, self._arrays, self._updated)
        self._arrays, self._updated = None, False
        return summary
