"""The coordinator's one reader of site replies: Flower Messages in, typed records out.

Every strategy wrapper, the per-site reporting and the run's lineage read replies through
:func:`read_reply`; nothing else looks inside a reply's records. A reply that breaks the
contract of :mod:`imaging.replies` raises a :class:`ReplyError` naming the key and the value;
:class:`~aggregation.validation.ValidatingStrategy` turns it into a counted, per-site rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flwr.app import ArrayRecord, Message

from imaging.errors import ReplyError
from imaging.replies import SITE_RECORD, EvaluateReply, SiteFacts, TrainReply, check_site_name, record_key

__all__ = ["Phase", "ReplyError", "SiteReply", "claimed_site", "read_reply"]

Phase = Literal["train", "evaluate"]
_CONTRACT = {"train": TrainReply, "evaluate": EvaluateReply}


@dataclass(frozen=True)
class SiteReply:
    """One successful reply, parsed: who claims to have sent it, its metrics, its facts, its weights."""

    node_id: int
    site: str  # the name in its facts, else ``node-<id>``
    metrics: TrainReply | EvaluateReply
    facts: SiteFacts | None
    arrays: ArrayRecord | None  # train replies only


def claimed_site(reply: Message) -> str:
    """The site name a reply claims, if it is a valid one, else ``node-<id>``. Never raises."""
    if not reply.has_error():
        record = reply.content.config_records.get(SITE_RECORD)
        if record is not None:
            try:
                return check_site_name(record.get(record_key("site_name")))
            except ReplyError:
                pass
    return "node-%d" % reply.metadata.src_node_id


def read_reply(reply: Message, phase: Phase) -> SiteReply:
    """The typed content of a successful ``phase`` reply, or a :class:`ReplyError` saying why not.

    A train reply carries exactly one ArrayRecord and one MetricRecord; an evaluate reply one
    MetricRecord and no weights. Either may carry the site's facts (ConfigRecord ``"site"``) and
    nothing else.
    """
    if reply.has_error():
        raise ReplyError(f"an error reply has no content ({reply.error.reason[:200]})")
    content = reply.content
    arrays = len(content.array_records)
    if phase == "train" and arrays != 1:
        raise ReplyError(f"expected exactly one ArrayRecord, got {arrays}")
    if phase == "evaluate" and arrays:
        raise ReplyError(f"an evaluate reply carries no weights, got {arrays} ArrayRecord(s)")
    if len(content.metric_records) != 1:
        raise ReplyError(f"expected exactly one MetricRecord, got {len(content.metric_records)}")
    others = sorted(set(content.config_records) - {SITE_RECORD})
    if others:
        raise ReplyError(f"unexpected ConfigRecord(s) {others[:3]}; a reply carries only {SITE_RECORD!r}")
    metrics = _CONTRACT[phase].from_record(next(iter(content.metric_records.values())))
    facts = None
    if SITE_RECORD in content.config_records:
        facts = SiteFacts.from_record(content.config_records[SITE_RECORD])
    site = facts.site_name if facts else "node-%d" % reply.metadata.src_node_id
    weights = next(iter(content.array_records.values())) if phase == "train" else None
    return SiteReply(reply.metadata.src_node_id, site, metrics, facts, weights)
