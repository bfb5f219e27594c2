"""Per-site metrics out of reply messages, and the round summaries built from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message

__all__ = ["SiteMetrics", "site_metrics", "summarize_evaluation"]


@dataclass(frozen=True)
class SiteMetrics:
    site: str
    metrics: dict[str, float]


def site_metrics(replies: Iterable[Message]) -> list[SiteMetrics]:
    """The metrics of each successful reply, named by the site that sent them."""
    out = []
    for reply in replies:
        if reply.has_error():
            continue
        content = reply.content
        site = "node-%d" % reply.metadata.src_node_id
        if "site" in content.config_records:
            site = str(content.config_records["site"].get("site-name", site))
        metrics = {}
        for record in content.metric_records.values():
            metrics.update({k: float(v) for k, v in record.items() if isinstance(v, (int, float))})
        out.append(SiteMetrics(site=site, metrics=metrics))
    return sorted(out, key=lambda s: s.site)


def summarize_evaluation(sites: list[SiteMetrics]) -> dict[str, float]:
    """Pooled Dice over all sites' held-out voxels, plus the mean and the worst site."""
    if not sites:
        return {}
    dices = [s.metrics["dice"] for s in sites if "dice" in s.metrics]
    inter = sum(s.metrics.get("dice-intersection", 0.0) for s in sites)
    denom = sum(s.metrics.get("dice-predicted", 0.0) + s.metrics.get("dice-truth", 0.0) for s in sites)
    summary = {"sites": float(len(sites))}
    if dices:
        summary["dice_mean"] = sum(dices) / len(dices)
        summary["dice_min"] = min(dices)
        summary["dice_spread"] = max(dices) - min(dices)
    summary["dice_pooled"] = 1.0 if denom == 0 else 2.0 * inter / denom
    return summary
