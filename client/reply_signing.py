"""Every reply signed with the node's key: the site name, run, round, sample count and weights.

A Flower mod, outermost around both handlers, so that it signs the reply exactly as it leaves the
node. The coordinator verifies the signature against the key the site enrolled with
(:mod:`privacy.enrolment`): a reply claiming another site's name, replayed in another round or
altered on the way does not verify. A site without a node key (``node-key`` / ``[site] node_key``)
sends unsigned replies, which a coordinator with enrolled sites refuses.
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from imaging.replies import NUM_EXAMPLES, SITE_RECORD, ReplyStatement, SiteFacts, arrays_digest
from privacy.enrolment import load_node_key, sign_statement

from .site import SiteResolver

__all__ = ["reply_signing_mod", "statement_for"]


def _round(message: Message) -> int:
    try:
        return int(message.content["config"].get("server-round", 0))
    except (KeyError, TypeError, ValueError):
        return 0


def statement_for(instruction: Message, reply: Message, facts: SiteFacts, node_id: int) -> ReplyStatement:
    """What the site signs for ``reply`` to ``instruction``."""
    content = reply.content
    metrics = next(iter(content.metric_records.values()))
    arrays = next(iter(content.array_records.values()), None)
    return ReplyStatement(
        site=facts.site_name, run_id=int(instruction.metadata.run_id), server_round=_round(instruction),
        phase=str(instruction.metadata.message_type), node_id=int(node_id),
        reply_to=str(instruction.metadata.message_id), num_examples=int(metrics.get(NUM_EXAMPLES, 0)),
        arrays_sha256=arrays_digest(arrays) if arrays is not None else "",
        manifest_sha256=facts.manifest_sha256,
    )


def reply_signing_mod(resolve_site: SiteResolver) -> Mod:
    """A mod that signs each successful reply with the key of the site ``resolve_site`` names."""

    def sign(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if reply.has_error() or SITE_RECORD not in reply.content.config_records:
            return reply
        node_key = resolve_site(context.node_config).node_key
        if node_key is None:
            return reply
        facts = SiteFacts.from_record(reply.content.config_records[SITE_RECORD])
        statement = statement_for(message, reply, facts, context.node_id)
        signed = replace(facts, signature=sign_statement(load_node_key(node_key), statement))
        reply.content[SITE_RECORD] = ConfigRecord(signed.to_record())
        return reply

    return sign
