"""Per-site metrics out of reply messages, and the round summaries built from them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from imaging.metrics import DiceCounts
from imaging.replies import EvaluateReply, SiteFacts, TrainReply

from .arrays import decode_array
from .replies import Phase, ReplyError, read_reply

__all__ = ["SiteMetrics", "UPDATE_NORM", "site_metrics", "summarize_evaluation", "uncounted_sites", "update_norm"]

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


def uncounted_sites(sites: Iterable[SiteMetrics]) -> list[str]:
    """The sites whose evaluation lacks a voxel count that pooled Dice needs (a policy kept it)."""
    return sorted(s.site for s in sites if s.evaluation().counts is None)


def _dice_stats(dices: list[float], prefix: str = "") -> dict[str, float]:
    if not dices:
        return {}
    return {f"{prefix}dice_mean": sum(dices) / len(dices), f"{prefix}dice_min": min(dices),
            f"{prefix}dice_spread": max(dices) - min(dices)}


def summarize_evaluation(sites: list[SiteMetrics]) -> dict[str, float]:
    """Pooled Dice over all sites' held-out voxels, plus the mean and the worst site.

    Nothing is invented: ``dice_pooled`` exists only when every evaluating site sent its voxel
    counts (:func:`uncounted_sites` names those that did not), and the mean and the worst site
    cover the sites that sent a Dice. These are always the received (global) model's figures;
    sites that also evaluated their personalised variant (``local-norm``) add
    ``local_norm_dice_mean``, ``_min`` and ``_spread`` over those sites.
    """
    if not sites:
        return {}
    replies = [s.evaluation() for s in sites]
    summary = {"sites": float(len(sites))}
    summary.update(_dice_stats([r.dice for r in replies if r.dice is not None]))
    counts = [r.counts for r in replies]
    if all(c is not None for c in counts):  # pooled over every site, or not at all
        pooled = DiceCounts()
        for c in counts:
            pooled = pooled.merge(c)  # type: ignore[arg-type]
        summary["dice_pooled"] = pooled.dice
    summary.update(_dice_stats([r.local_norm_dice for r in replies if r.local_norm_dice is not None],
                               "local_norm_"))
    return summary
