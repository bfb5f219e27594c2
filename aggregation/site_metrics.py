"""Per-site metrics out of reply messages, and the round summaries built from them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from .arrays import decode_array

__all__ = ["SiteMetrics", "site_metrics", "summarize_evaluation", "update_norm"]


@dataclass(frozen=True)
class SiteMetrics:
    """One site's reply: its numeric metrics and its string facts (manifest hash, input stats)."""

    site: str
    metrics: dict[str, float]
    facts: dict[str, str] = field(default_factory=dict)


def update_norm(reference: ArrayRecord, update: ArrayRecord) -> float:
    """L2 norm of ``update - reference`` over every array (the size of a site's step)."""
    total = 0.0
    for key, array in update.items():
        if key in reference:
            diff = decode_array(array).astype(np.float64) - decode_array(reference[key]).astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def site_metrics(replies: Iterable[Message], reference: ArrayRecord | None = None) -> list[SiteMetrics]:
    """The metrics of each successful reply, named by the site that sent them.

    With ``reference`` (the global weights sent this round), each reply carrying weights also
    gets ``update-norm``.
    """
    out = []
    for reply in replies:
        if reply.has_error():
            continue
        content = reply.content
        site = "node-%d" % reply.metadata.src_node_id
        facts: dict[str, str] = {}
        if "site" in content.config_records:
            facts = {k: str(v) for k, v in content.config_records["site"].items()}
            site = facts.get("site-name", site)
        metrics = {}
        for record in content.metric_records.values():
            metrics.update({k: float(v) for k, v in record.items() if isinstance(v, (int, float))})
        if reference is not None and content.array_records:
            arrays = next(iter(content.array_records.values()))
            try:
                metrics["update-norm"] = update_norm(reference, arrays)
            except (ValueError, TypeError, EOFError, OSError):
                pass  # wrong shapes or undecodable bytes: validation refuses the reply, saying why
        out.append(SiteMetrics(site=site, metrics=metrics, facts=facts))
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
