"""Refuse updates that point away from, or reach far beyond, the round's robust centre.

A poisoning site can send a well-formed update that is a few times an honest one and reversed
(``simulation.misbehave``'s ``signflip:5``): it passes :mod:`aggregation.validation`'s norm bound
(10x the median) and, at four sites, FedAvg averages it in and FedTrimmedAvg at beta 0.2 trims
nothing. :class:`ScreeningStrategy` wraps any strategy, Flower style, and before the strategy
aggregates it compares every update ``u_i = w_i - w_sent`` with the round's robust centre:

- direction: the cosine of ``u_i`` to the coordinate-wise median of the round's updates;
- size: ``||u_i||`` over the median of the round's update norms.

An update below ``min_cosine`` or above ``max_norm_ratio`` is refused and reported per site
through the same ``on_reject`` path as validation. The median is the centre because one site of
three or more cannot move it far, whatever it sends.

Two updates have no robust centre: their median is their mean, which a single attacker owns.
With two replies the screen compares them with each other instead; when they disagree
(cosine below ``min_cosine`` or norm ratio above ``max_norm_ratio``) which one is honest cannot
be told, so both are refused and the round leaves the model unchanged. One reply is not screened.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .arrays import decode_array
from .delegating import DelegatingStrategy
from .errors import StrategyConfigError
from .replies import claimed_site
from .validation import OnReject, Rejection

__all__ = [
    "ScreenSettings",
    "UpdateScore",
    "OnScores",
    "ScreeningStrategy",
    "score_updates",
]

log = logging.getLogger("fedseg.aggregation")


@dataclass(frozen=True)
class ScreenSettings:
    """The thresholds of the update screen (run config ``screen-*``).

    Parameters
    ----------
    enabled : bool
        ``screen-updates``: screen every round's updates before the strategy aggregates them.
    min_cosine : float
        ``screen-min-cosine``, in [-1, 1): an update whose cosine to the round's median update
        is lower is refused.
    max_norm_ratio : float
        ``screen-max-norm-ratio``, > 1: an update whose norm exceeds this times the round's
        median update norm is refused.
    """

    enabled: bool = True
    min_cosine: float = 0.0
    max_norm_ratio: float = 3.0

    def __post_init__(self) -> None:
        if not -1 <= self.min_cosine < 1:
            raise StrategyConfigError(f"screen-min-cosine must lie in [-1, 1), got {self.min_cosine}")
        if not self.max_norm_ratio > 1:
            raise StrategyConfigError(f"screen-max-norm-ratio must be > 1, got {self.max_norm_ratio}")

    def params(self) -> dict[str, object]:
        """For lineage and experiment tracking."""
        if not self.enabled:
            return {"screen": False}
        return {"screen": True, "screen_min_cosine": self.min_cosine,
                "screen_max_norm_ratio": self.max_norm_ratio}


@dataclass(frozen=True)
class UpdateScore:
    """One update against the round's centre: cosine of direction and ratio of norms.

    With two updates the centre is the other update (see the module's notes)."""

    site: str
    cosine: float
    norm_ratio: float


# (server round, every screened update's score)
OnScores = Callable[[int, list[UpdateScore]], None]
# array key -> float64 values
_Flat = dict[str, np.ndarray]


def _cosine(dot: float, a: float, b: float) -> float:
    return dot / (a * b) if a > 0 and b > 0 else 0.0


def score_updates(updates: Sequence[_Flat]) -> list[tuple[float, float]]:
    """``(cosine, norm ratio)`` of each update against the robust centre of ``updates``.

    Three or more: the centre is the coordinate-wise median update and the median norm.
    Two: each is compared with the other (cosine between them; its norm over the other's).
    One: ``(1.0, 1.0)``. Computed key by key, so memory peaks at one layer times the count.
    """
    n = len(updates)
    if n < 2:
        return [(1.0, 1.0)] * n
    sq = np.zeros(n)
    dots = np.zeros(n)  # with the centre (n >= 3) or with the other update (n == 2)
    centre_sq = 0.0
    for key in [k for k in updates[0] if all(k in u for u in updates)]:
        stack = np.stack([u[key].ravel() for u in updates])
        # einsum, not np.dot per row: BLAS calls on small vectors stall on a loaded machine
        sq += np.einsum("ij,ij->i", stack, stack)
        if n == 2:
            dots += np.einsum("j,j->", stack[0], stack[1])
        else:
            centre = np.median(stack, axis=0)
            centre_sq += float(np.einsum("j,j->", centre, centre))
            dots += np.einsum("ij,j->i", stack, centre)
    norms = [math.sqrt(float(s)) for s in sq]
    if n == 2:
        ratios = [norms[0] / norms[1] if norms[1] > 0 else math.inf,
                  norms[1] / norms[0] if norms[0] > 0 else math.inf]
        cos = _cosine(float(dots[0]), norms[0], norms[1])
        return [(cos, ratios[0]), (cos, ratios[1])]
    median_norm = statistics.median(norms)
    centre_norm = math.sqrt(centre_sq)
    return [(_cosine(float(d), nm, centre_norm), nm / median_norm if median_norm > 0 else 1.0)
            for d, nm in zip(dots, norms, strict=True)]


class ScreeningStrategy(DelegatingStrategy):
    """Refuses updates far from the round's robust centre, then lets ``inner`` aggregate the rest.

    Parameters
    ----------
    inner : Strategy
        Any Message-API strategy.
    settings : ScreenSettings
        The thresholds; with ``enabled`` false every reply passes untouched.
    on_reject : callable (server_round, site, reason)
        Called once for every refused update (reasons start with ``direction:``,
        ``norm-ratio:`` or ``conflict:``).
    on_scores : callable (server_round, scores)
        Called every screened round with each update's cosine and norm ratio.
    all_or_nothing : bool
        Client-level DP: any refusal voids the round (Flower's DP wrapper is calibrated for
        every sampled site).
    ignore_keys : collection of str
        Arrays left out of the scores: with FedBN-style ``local-norm`` the sites' normalisation
        layers are their own, not steps from the global ones.

    Notes
    -----
    Meant to sit inside :class:`~aggregation.validation.ValidatingStrategy`, which hands it only
    well-formed, finite, fresh replies in a fixed order; error replies pass to ``inner``
    untouched and are not screened.
    """

    def __init__(
        self,
        inner: Strategy,
        settings: ScreenSettings | None = None,
        on_reject: OnReject | None = None,
        on_scores: OnScores | None = None,
        *,
        all_or_nothing: bool = False,
        ignore_keys: Collection[str] = (),
    ) -> None:
        self.inner = inner
        self.ignore_keys = frozenset(ignore_keys)
        self.settings = settings or ScreenSettings()
        self.on_reject: OnReject = on_reject or (lambda _r, _s, _m: None)
        self.on_scores: OnScores = on_scores or (lambda _r, _s: None)
        self.all_or_nothing = all_or_nothing
        self.rejections: list[Rejection] = []  # the last aggregated round's
        self.scores: list[UpdateScore] = []  # the last aggregated round's
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.rejections, self.scores = [], []
        if not self.settings.enabled or self._sent is None:
            return self.inner.aggregate_train(server_round, replies)
        kept, self.rejections, self.scores = self.screen(server_round, replies)
        if self.scores:
            self.on_scores(server_round, self.scores)
        for r in self.rejections:
            self.on_reject(r.server_round, r.site, r.reason)
        if not any(not m.has_error() for m in kept):
            return None, None
        if self.all_or_nothing and self.rejections:
            log.warning("round %d discarded: client-level DP needs every sampled site's update", server_round)
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def screen(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], list[Rejection], list[UpdateScore]]:
        """(replies to aggregate, in their order; refusals; scores). Calls no callback."""
        assert self._sent is not None
        content = [i for i, m in enumerate(replies) if not m.has_error()]
        sent = {k: v.astype(np.float64) for k, a in self._sent.items()
                if k not in self.ignore_keys and np.issubdtype((v := decode_array(a)).dtype, np.inexact)}
        updates = [_update(sent, replies[i]) for i in content]
        scored = score_updates(updates)
        sites = [claimed_site(replies[i]) for i in content]
        scores = [UpdateScore(s, c, r) for s, (c, r) in zip(sites, scored, strict=True)]
        reasons = {i: reason for i, score in zip(content, scores, strict=True)
                   if (reason := self._reason(score, len(content)))}
        kept = [m for i, m in enumerate(replies) if i not in reasons]
        rejected = [Rejection(server_round, replies[i].metadata.src_node_id, claimed_site(replies[i]), reason)
                    for i, reason in sorted(reasons.items())]
        return kept, rejected, scores

    def _reason(self, score: UpdateScore, n: int) -> str | None:
        s = self.settings
        if n < 2:
            return None
        if n == 2:
            pair_ratio = max(score.norm_ratio, 1 / score.norm_ratio) if score.norm_ratio > 0 else math.inf
            if score.cosine < s.min_cosine or pair_ratio > s.max_norm_ratio:
                return (f"conflict: the round's two updates disagree (cosine {score.cosine:.3f}, "
                        f"norm ratio {pair_ratio:.3g}; limits screen-min-cosine {s.min_cosine:g}, "
                        f"screen-max-norm-ratio {s.max_norm_ratio:g}); with two sites the outlier "
                        "cannot be told, so neither is aggregated")
            return None
        if score.cosine < s.min_cosine:
            return (f"direction: cosine {score.cosine:.3f} to the round's median update, below "
                    f"screen-min-cosine {s.min_cosine:g}")
        if score.norm_ratio > s.max_norm_ratio:
            return (f"norm-ratio: update norm {score.norm_ratio:.3g} x the round's median norm, above "
                    f"screen-max-norm-ratio {s.max_norm_ratio:g}")
        return None


def _update(sent: _Flat, reply: Message) -> _Flat:
    """``reply - sent`` in float64 over the floating arrays both hold."""
    arrays = next(iter(reply.content.array_records.values()))
    out: _Flat = {}
    for key, reference in sent.items():
        if key in arrays:
            out[key] = decode_array(arrays[key]).astype(np.float64) - reference
    return out
