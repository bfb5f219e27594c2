"""Per-site metrics out of reply messages, and the round summaries built from them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from imaging.replies import EvaluateReply, SiteFacts, TrainReply

from .arrays import decode_array
from .replies import Phase, ReplyError, read_reply

__all__ = ["SiteMetrics", "UPDATE_NORM", "site_metrics", "summarize_evaluation", "update_norm"]

#: The size of a site's step, computed by the coordinator (not part of the reply).
UPDATE_NORM = "update-norm"


@dataclass(frozen=True)
class SiteMetrics:
    """One site's reply as logged: its numeric metrics and its string facts (manifest hash, input stats).

    ``metrics`` holds the reply's contract keys (:mod:`imaging.replies`) plus ``update-norm``,
    which the coordinator computes; the typed views below read them back.
    """

    site: str
    metrics: dict[str, float]
    facts: dict[str, str] = field(default_factory=dict)

    def train(self) -> TrainReply:
        return TrainReply.from_record(_only(self.metrics, TrainReply.keys()))

    def evaluation(self) -> EvaluateReply:
        return EvaluateReply.from_record(_only(self.metrics, EvaluateReply.keys()))

    def site_facts(self) -> SiteFacts | None:
        return SiteFacts.from_record(self.facts) if self.facts else None


def _only(metrics: dict[str, float], keys: frozenset[str]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in keys}


def update_norm(reference: ArrayRecord, update: ArrayRecord) -> float:
    """L2 norm of ``update - reference`` over every array (the size of a site's step)."""
    total = 0.0
    for key, array in update.items():
        if key in reference:
            diff = decode_array(array).astype(np.float64) - decode_array(reference[key]).astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def site_metrics(
    replies: Iterable[Message], phase: Phase, reference: ArrayRecord | None = None
) -> list[SiteMetrics]:
    """The metrics of each successful reply that keeps its contract, named by its site.

    Replies that break the contract are left out: validation refuses them and says why. With
    ``reference`` (the global weights sent this round), each train reply also gets
    ``update-norm``.
    """
    out = []
    for reply in replies:
        try:
            parsed = read_reply(reply, phase)
        except ReplyError:
            continue
        metrics = {k: float(v) for k, v in parsed.metrics.to_record().items()}
        if reference is not None and parsed.arrays is not None:
            try:
                metrics[UPDATE_NORM] = update_norm(reference, parsed.arrays)
            except (ValueError, TypeError, EOFError, OSError):
                pass  # wrong shapes or undecodable bytes: validation refuses the reply, saying why
        facts = parsed.facts.to_record() if parsed.facts else {}
        out.append(SiteMetrics(site=parsed.site, metrics=metrics, facts=facts))
    return sorted(out, key=lambda s: s.site)


def summarize_evaluation(sites: list[SiteMetrics]) -> dict[str, float]:
    """Pooled Dice over all sites' held-out voxels, plus the mean and the worst site."""
    if not sites:
        return {}
    replies = [s.evaluation() for s in sites]
    dices = [r.dice for r in replies if r.dice is not None]
    inter = sum(r.dice_intersection or 0.0 for r in replies)
    denom = sum((r.dice_predicted or 0.0) + (r.dice_truth or 0.0) for r in replies)
    summary = {"sites": float(len(sites))}
    if dices:
        summary["dice_mean"] = sum(dices) / len(dices)
        summary["dice_min"] = min(dices)
        summary["dice_spread"] = max(dices) - min(dices)
    summary["dice_pooled"] = 1.0 if denom == 0 else 2.0 * inter / denom
    return summary
