"""Refuse malformed, poisoned, duplicated or stale updates before any strategy averages them.

Pure checks (finite values, schema, update norms, digests) sit apart from the stateful
:class:`ValidatingStrategy`, a wrapper in the style of Flower's DP wrappers: it filters the
train replies, reports each refusal, and delegates everything else to the strategy it wraps.

Staleness: Flower's Message-API strategies leave ``Metadata.group_id`` empty (only the legacy
workflows set it to the round), and a reply copies its instruction's ``group_id``. The wrapper
therefore stamps ``group_id = str(server_round)`` on every train instruction it hands to the
grid and refuses replies whose ``group_id`` differs. Where the grid has given the instructions
message ids (every real grid does, in ``push_messages``), a reply must also answer one of them.
"""

from __future__ import annotations

import logging

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from imaging.replies import arrays_digest

from .arrays import decode_array, declared_mismatch
from .delegating import DelegatingStrategy
from .identity import SiteIdentities
from .replies import Phase, ReplyError, claimed_site, read_reply
from .site_metrics import update_norm

log = logging.getLogger("fedseg.aggregation")

__all__ = [
    "ValidatingStrategy",
    "Rejection",
    "OnReject",
    "Schema",
    "schema_of",
    "schema_problems",
    "non_finite_keys",
    "arrays_digest",
    "update_norm",
    "keep_common_metrics",
]

# (server round, site or node, reason)
OnReject = Callable[[int, str, str], None]
# array key -> (shape, numpy dtype name)
Schema = Mapping[str, tuple[tuple[int, ...], str]]
# array key -> values (read-only views of the reply's bytes, see aggregation.arrays)
Decoded = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Rejection:
    """One refused reply: who sent it and why (``reason`` starts with its kind)."""

    server_round: int
    node_id: int
    site: str
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


# ----------------------------------------------------------------------------- pure helpers


def schema_of(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, dtype)`` of every array in ``record``."""
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in record.items()}


def schema_problems(record: ArrayRecord, expected: Schema, limit: int = 3) -> list[str]:
    """What differs between ``record`` and ``expected``: missing and unexpected keys, then
    shapes and dtypes (at most ``limit`` of each kind, so a reason stays readable)."""
    got = schema_of(record)
    problems: list[str] = []
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing:
        problems.append(f"missing key(s) {_names(missing, limit)}")
    if extra:
        problems.append(f"unexpected key(s) {_names(extra, limit)}")
    shapes = [k for k in expected if k in got and got[k][0] != tuple(expected[k][0])]
    problems += [f"{k!r} has shape {got[k][0]}, expected {tuple(expected[k][0])}" for k in shapes[:limit]]
    dtypes = [k for k in expected if k in got and got[k][1] != str(expected[k][1])]
    problems += [f"{k!r} has dtype {got[k][1]}, expected {expected[k][1]}" for k in dtypes[:limit]]
    return problems


def non_finite_keys(record: ArrayRecord) -> dict[str, int]:
    """``key -> number of NaN/inf values`` for every floating array that holds any."""
    return _non_finite({key: decode_array(array) for key, array in record.items()})


def _non_finite(decoded: Decoded) -> dict[str, int]:
    out = {}
    for key, values in decoded.items():
        if np.issubdtype(values.dtype, np.inexact):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                out[key] = bad
    return out


def _update_norm(reference: Decoded, update: Decoded) -> float:
    """:func:`update_norm` on decoded arrays, ``reference`` already in float64 (same sums)."""
    total = 0.0
    for key, values in update.items():
        if key in reference:
            diff = values.astype(np.float64) - reference[key]
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _names(keys: list[str], limit: int) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _malformed(reply: Message, phase: Phase) -> str | None:
    try:
        read_reply(reply, phase)
    except ReplyError as exc:
        return str(exc)
    return None


def keep_common_metrics(replies: list[Message]) -> list[str]:
    """Cut every successful reply's MetricRecord to the keys all of them carry; the keys cut.

    Sites' policies (``[metrics] allowed``) may keep different optional metrics at home, and
    Flower's strategies refuse to aggregate MetricRecords whose keys differ
    (``InconsistentMessageReplies``). The per-site reports read the full records before this.
    """
    records = [(m, name, record) for m in replies if not m.has_error()
               for name, record in m.content.metric_records.items()]
    if not records:
        return []
    common = set.intersection(*(set(record) for _, _, record in records))
    cut = sorted(set().union(*(set(record) for _, _, record in records)) - common)
    if cut:
        for message, name, record in records:
            message.content[name] = MetricRecord({k: v for k, v in record.items() if k in common})
    return cut


# ----------------------------------------------------------------------------- the wrapper


class ValidatingStrategy(DelegatingStrategy):
    """Drops replies that must not be aggregated, then lets ``inner`` aggregate the rest.

    Parameters
    ----------
    inner : Strategy
        Any Message-API strategy (Flower's own, or one already wrapped, e.g. for DP).
    expected : ArrayRecord or Mapping[str, tuple[shape, dtype]] or None
        The schema every reply must match exactly. ``None``: the arrays of the first round
        configured (the initial model). Not each round's: Flower's FedAdam returns float64
        arrays from float32 replies (numpy 2 promotion), so later rounds send float64.
    norm_factor : float
        A reply whose update norm ``||reply - sent||`` exceeds ``norm_factor`` times the
        median update norm of this round's otherwise valid replies is refused. Needs at least
        3 such replies and a median > 0; skipped otherwise.
    on_reject : callable (server_round, site_or_node, reason)
        Called once for every refused train reply.
    on_reject_evaluate : callable (server_round, site_or_node, reason)
        Called once for every refused evaluate reply (one that breaks the reply contract or
        fails the identity checks).
    identities : SiteIdentities or None
        The enrolled sites (:mod:`aggregation.identity`): every reply, train and evaluate, must
        be signed by the key its site enrolled with and claim no more samples than its signed
        manifest declares. ``None``: names and counts are self-reported.
    max_weight_share : float
        A train reply whose sample count exceeds this share of the round's accepted total is
        refused (``weight: ...``); 1.0 (the default) caps nothing.

    Notes
    -----
    Train replies, in order: stale round, same node twice, the reply contract
    (:func:`aggregation.replies.read_reply`: one ArrayRecord, one MetricRecord whose keys and
    values :class:`imaging.replies.TrainReply` accepts, valid site facts), schema (each array's declared shape and dtype, and what its bytes
    actually hold, which is what the strategy aggregates; bytes that do not decode are
    malformed), non-finite values, the identity checks (signature, enrolment, manifest bound),
    byte-identical arrays from several nodes, weight share, update norm. A node that replied twice, and every node of a group of byte-identical
    updates, are all refused: which copy is genuine cannot be told. Error replies are passed to
    ``inner`` untouched. When no reply survives, ``aggregate_train`` returns ``(None, None)``
    without calling ``inner``. Evaluate replies are held to their contract
    (:class:`imaging.replies.EvaluateReply`) and the identity checks only.
    """

    def __init__(
        self,
        inner: Strategy,
        expected: ArrayRecord | Schema | None = None,
        norm_factor: float = 10.0,
        on_reject: OnReject | None = None,
        *,
        on_reject_evaluate: OnReject | None = None,
        identities: SiteIdentities | None = None,
        max_weight_share: float = 1.0,
        all_or_nothing: bool = False,
    ) -> None:
        self.all_or_nothing = all_or_nothing  # client-level DP: any rejection voids the round
        if not norm_factor > 1:
            raise ValueError(f"norm_factor must be > 1, got {norm_factor}")
        self.inner = inner
        self.expected: Schema | None = (
            schema_of(expected) if isinstance(expected, ArrayRecord) else expected
        )
        self.norm_factor = norm_factor
        self.on_reject: OnReject = on_reject or (lambda _r, _s, _m: None)
        self.on_reject_evaluate: OnReject = on_reject_evaluate or (lambda _r, _s, _m: None)
        if not 0 < max_weight_share <= 1:
            raise ValueError(f"max_weight_share must lie in (0, 1], got {max_weight_share}")
        self.identities = identities
        self.max_weight_share = max_weight_share
        self.evaluate_rejections: list[Rejection] = []  # the last evaluated round's
        self.rejections: list[Rejection] = []  # the last aggregated round's
        self._round: int | None = None
        self._sent_arrays: ArrayRecord | None = None
        self._sent_float64: dict[str, np.ndarray] | None = None  # decoded once per round
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._learn_node_keys(grid)
        for message in messages:
            message.metadata.group_id = str(server_round)
        if self.expected is None:
            self.expected = schema_of(arrays)
        self._round, self._sent_arrays, self._sent = server_round, arrays, messages
        self._sent_float64 = None
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        self._learn_node_keys(grid)
        return messages

    def unverified(self, phase: str) -> list[int]:
        """The nodes of the last ``phase`` round whose site name or sample count did not verify."""
        rejections = self.rejections if phase == "train" else self.evaluate_rejections
        return [r.node_id for r in rejections if r.kind in ("identity", "weight")]

    def _learn_node_keys(self, grid: Grid) -> None:
        """The public key the SuperLink authenticated each node with (none in simulation)."""
        if self.identities is not None:
            self.identities.node_keys = {n.node_id: bytes(n.public_key) for n in grid.get_nodes()
                                         if n.public_key}

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        kept, rejected = [], []
        for reply in replies:
            problem = None if reply.has_error() else (
                _malformed(reply, "evaluate") or self._identity_problem(server_round, reply, "evaluate"))
            if problem is None:
                kept.append(reply)
            else:
                rejected.append(Rejection(server_round, reply.metadata.src_node_id,
                                          claimed_site(reply), f"malformed: {problem}"))
        self.evaluate_rejections = rejected
        for r in rejected:
            self.on_reject_evaluate(r.server_round, r.site, r.reason)
        keep_common_metrics(kept)
        return self.inner.aggregate_evaluate(server_round, kept)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept, rejected = self.screen(server_round, replies)
        self.rejections = rejected
        for r in rejected:
            self.on_reject(r.server_round, r.site, r.reason)
        if not any(not m.has_error() for m in kept):
            return None, None
        if self.all_or_nothing and (rejected or any(m.has_error() for m in kept)):
            # the DP wrapper's noise is calibrated for every sampled site: with fewer, the
            # guarantee it reports would not hold, so the round leaves the model unchanged
            log.warning("round %d discarded: client-level DP needs every sampled site's update", server_round)
            return None, None
        # replies arrive in whatever order the sites finish; aggregating them in a fixed order
        # makes the floating-point sums, and so the run, reproducible
        kept.sort(key=lambda m: (m.has_error(), claimed_site(m) if not m.has_error() else "",
                                 m.metadata.src_node_id))
        keep_common_metrics(kept)
        return self.inner.aggregate_train(server_round, kept)

    # ------------------------------------------------------------------ the checks

    def screen(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], list[Rejection]]:
        """(replies to aggregate, in their order; refusals). Does not call ``on_reject``."""
        reasons: dict[int, str] = {}  # index in replies -> reason
        decoded: dict[int, Decoded] = {}  # index -> its arrays, decoded once for every check
        content = [i for i, m in enumerate(replies) if not m.has_error()]

        for i in content:
            stale = self._stale(server_round, replies[i])
            if stale:
                reasons[i] = f"stale: {stale}"

        per_node = Counter(replies[i].metadata.src_node_id for i in content if i not in reasons)
        for i in content:
            node = replies[i].metadata.src_node_id
            if i not in reasons and per_node[node] > 1:
                reasons[i] = f"duplicate: node {node} replied {per_node[node]} times in round {server_round}"

        for i in content:
            if i in reasons:
                continue
            problem = (self._content_problem(replies[i], self.expected, decoded, i)
                       or self._identity_problem(server_round, replies[i], "train"))
            if problem:
                reasons[i] = problem

        self._identical(replies, [i for i in content if i not in reasons], reasons)
        self._heavy(replies, [i for i in content if i not in reasons], reasons)
        self._outliers(decoded, [i for i in content if i not in reasons], reasons)

        kept = [m for i, m in enumerate(replies) if i not in reasons]
        rejected = [
            Rejection(server_round, replies[i].metadata.src_node_id, claimed_site(replies[i]), reason)
            for i, reason in sorted(reasons.items())
        ]
        return kept, rejected

    def _stale(self, server_round: int, reply: Message) -> str | None:
        group = reply.metadata.group_id
        if group != str(server_round):
            return f"reply carries group_id {group!r}, this is round {server_round}"
        sent_ids = {m.metadata.message_id for m in self._sent} if self._round == server_round else set()
        if sent_ids and "" not in sent_ids and reply.metadata.reply_to_message_id not in sent_ids:
            return (
                f"reply answers message {reply.metadata.reply_to_message_id!r}, "
                f"not one sent in round {server_round}"
            )
        return None

    def _content_problem(
        self, reply: Message, expected: Schema | None, decoded: dict[int, Decoded], index: int
    ) -> str | None:
        malformed = _malformed(reply, "train")
        if malformed:
            return f"malformed: {malformed}"
        arrays = next(iter(reply.content.array_records.values()))
        if expected is not None:
            problems = schema_problems(arrays, expected)
            if problems:
                return "schema: " + "; ".join(problems)
        values: dict[str, np.ndarray] = {}
        for key, array in arrays.items():
            try:
                values[key] = decode_array(array)
            except Exception as exc:  # np.load on hostile bytes: ValueError, EOFError, TypeError...
                return f"malformed: array {key!r} cannot be decoded ({type(exc).__name__}: {exc})"
        wrong = [(k, m) for k in values if (m := declared_mismatch(arrays[k], values[k]))]
        if wrong:
            return "schema: " + "; ".join(f"{k!r} {m}" for k, m in wrong[:3])
        decoded[index] = values
        bad = _non_finite(values)
        if bad:
            total = sum(bad.values())
            return f"non-finite: {total} NaN/inf value(s) in {_names(list(bad), 3)}"
        return None

    def _identity_problem(self, server_round: int, reply: Message, phase: Phase) -> str | None:
        if self.identities is None:
            return None
        return self.identities.problem(reply, read_reply(reply, phase), server_round, phase)

    def _heavy(self, replies: list[Message], candidates: list[int], reasons: dict[int, str]) -> None:
        """Refuse replies whose sample count is above ``max_weight_share`` of the round's total."""
        if self.max_weight_share >= 1 or not candidates:
            return
        weights = {i: read_reply(replies[i], "train").metrics.num_examples for i in candidates}
        total = sum(weights.values())
        for i, weight in weights.items():
            if weight > self.max_weight_share * total:
                reasons[i] = (f"weight: {weight} samples are {weight / total:.1%} of the round's "
                              f"{total}, above max-weight-share {self.max_weight_share:g}")

    def _identical(self, replies: list[Message], candidates: list[int], reasons: dict[int, str]) -> None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i in candidates:
            groups[arrays_digest(next(iter(replies[i].content.array_records.values())))].append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            nodes = [replies[i].metadata.src_node_id for i in members]
            for i, node in zip(members, nodes, strict=True):
                others = ", ".join(str(n) for n in nodes if n != node)
                reasons[i] = f"duplicate: arrays byte-identical to those of node(s) {others}"

    def _outliers(self, decoded: dict[int, Decoded], candidates: list[int], reasons: dict[int, str]) -> None:
        if self._sent_arrays is None or len(candidates) < 3:
            return
        if self._sent_float64 is None:
            self._sent_float64 = {
                key: decode_array(array).astype(np.float64) for key, array in self._sent_arrays.items()
            }
        norms = {i: _update_norm(self._sent_float64, decoded[i]) for i in candidates}
        median = statistics.median(norms.values())
        if median <= 0:
            return
        bound = self.norm_factor * median
        for i, norm in norms.items():
            if norm > bound:
                reasons[i] = (
                    f"norm: update norm {norm:.4g} exceeds {self.norm_factor:g} x the round's "
                    f"median {median:.4g} (= {bound:.4g})"
                )
