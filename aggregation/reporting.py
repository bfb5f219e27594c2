"""A strategy wrapper that reports each site's metrics every round, then delegates."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .site_metrics import SiteMetrics, site_metrics

__all__ = ["SiteReportingStrategy", "RoundReport"]

# (phase "train" | "evaluate", server round, per-site metrics, error reasons by node)
RoundReport = Callable[[str, int, list[SiteMetrics], list[str]], None]


class SiteReportingStrategy(Strategy):
    """Wraps any Message-API strategy; the round loop stays Flower's own."""

    def __init__(self, inner: Strategy, report: RoundReport) -> None:
        self.inner = inner
        self.report = report
        self._sent: ArrayRecord | None = None  # this round's global weights, for update norms

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.report("train", server_round, site_metrics(replies, "train", self._sent), _errors(replies))
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.report("evaluate", server_round, site_metrics(replies, "evaluate"), _errors(replies))
        return self.inner.aggregate_evaluate(server_round, replies)


def _errors(replies: list[Message]) -> list[str]:
    return [
        f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()
    ]
