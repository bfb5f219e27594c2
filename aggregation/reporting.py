"""A strategy wrapper that reports each site's metrics every round, around its inner strategy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .delegating import DelegatingStrategy
from .site_metrics import SiteMetrics, site_metrics

__all__ = ["SiteReportingStrategy", "RoundReport"]

_T = TypeVar("_T")

# (phase "train" | "evaluate", server round, per-site metrics, error reasons by node)
RoundReport = Callable[[str, int, list[SiteMetrics], list[str]], None]


class SiteReportingStrategy(DelegatingStrategy):
    """Wraps any Message-API strategy; the round loop stays Flower's own.

    Each round is reported once ``inner`` has aggregated it (also when it raises), leaving out
    the replies of the nodes ``unverified(phase)`` names: those whose site name or sample count
    the validation could not verify, so that no report, metric or lineage carries them.
    """

    def __init__(self, inner: Strategy, report: RoundReport,
                 unverified: Callable[[str], Iterable[int]] | None = None) -> None:
        self.inner = inner
        self.report = report
        self.unverified = unverified or (lambda _phase: ())
        self._sent: ArrayRecord | None = None  # this round's global weights, for update norms

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        return self._reported("train", server_round, replies,
                              lambda: self.inner.aggregate_train(server_round, replies))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        return self._reported("evaluate", server_round, replies,
                              lambda: self.inner.aggregate_evaluate(server_round, replies))

    def _reported(self, phase: str, server_round: int, replies: list[Message], aggregate: Callable[[], _T]) -> _T:
        # read before ``inner`` runs: validation may cut the records to the keys all sites share
        reference = self._sent if phase == "train" else None
        read = [(r.metadata.src_node_id, m) for r in replies for m in site_metrics([r], phase, reference)]
        try:
            return aggregate()
        finally:
            unverified = set(self.unverified(phase))
            sites = sorted((m for node, m in read if node not in unverified), key=lambda s: s.site)
            self.report(phase, server_round, sites, _errors(replies))


def _errors(replies: list[Message]) -> list[str]:
    return [
        f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()
    ]
