"""Who sent a reply, and how much it may weigh: checked against the sites' enrolment.

With enrolled sites (:class:`privacy.enrolment.EnrolledSites`), a reply is accepted only when

- it names an enrolled site, and its signature verifies with that site's enrolled key over the
  :class:`imaging.replies.ReplyStatement` the coordinator rebuilds (this run, this round, the
  node it came from, the instruction it answers, its sample count and its weights);
- where the SuperLink authenticated the node (``--enable-supernode-auth``: ``Grid.get_nodes``
  reports each node's public key), that key is the one enrolled for the site it names;
- its sample count is at most the usable slices of the site's signed manifest.

Without enrolled sites the names and counts are self-reported; :func:`trust_statement` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Message

from imaging.replies import ReplyStatement, arrays_digest
from privacy.enrolment import EnrolledSites, load_node_public_key

from .replies import SiteReply

__all__ = ["SiteIdentities", "trust_statement"]


def trust_statement(enrolled: EnrolledSites | None) -> str:
    """One line for the log and the lineage: what the coordinator trusts about site identities."""
    if not enrolled:
        return ("self-reported: no enrolled sites, so site names and sample counts are taken as "
                "the sites state them (enrol sites with `fedseg pki enrol`)")
    return (f"enrolled: {len(enrolled)} site(s) in {enrolled.source}; replies must be signed by the "
            "enrolled node key and stay within the signed manifest")


@dataclass
class SiteIdentities:
    """The identity and weight checks of one run (used by :class:`ValidatingStrategy`)."""

    enrolled: EnrolledSites
    node_keys: Mapping[int, bytes] | None = None  # node id -> PEM public key, from the SuperLink

    def problem(self, reply: Message, parsed: SiteReply, server_round: int, phase: str) -> str | None:
        """Why ``reply`` must be refused (``identity: ...`` or ``weight: ...``), else None."""
        facts = parsed.facts
        if facts is None:
            return "identity: the reply names no site (no 'site' record); enrolled sites sign their replies"
        site = facts.site_name
        enrolment = self.enrolled.get(site)
        if enrolment is None:
            return f"identity: site {site!r} is not enrolled ({len(self.enrolled)} enrolled site(s))"
        node = reply.metadata.src_node_id
        authenticated = load_node_public_key((self.node_keys or {}).get(node, b""))
        if authenticated is not None:
            owner = self.enrolled.site_of_key(authenticated)
            if owner != site:
                whose = f"the key enrolled for {owner!r}" if owner else "a key no site enrolled"
                return f"identity: node {node} authenticated with {whose}, but its reply claims to be {site!r}"
        if not facts.signature:
            return f"identity: the reply claiming to be {site!r} is not signed with the site's node key"
        statement = ReplyStatement(
            site=site, run_id=int(reply.metadata.run_id), server_round=server_round, phase=phase,
            node_id=int(node), reply_to=str(reply.metadata.reply_to_message_id),
            num_examples=parsed.metrics.num_examples,
            arrays_sha256=arrays_digest(parsed.arrays) if parsed.arrays is not None else "",
            manifest_sha256=facts.manifest_sha256,
        )
        if not self.enrolled.verify(statement, facts.signature):
            return (f"identity: the reply's signature does not verify with the key enrolled for {site!r} "
                    f"({enrolment.fingerprint}): another site claiming its name, or a reply altered "
                    "or replayed after signing")
        if parsed.metrics.num_examples > enrolment.max_samples:
            return (f"weight: {site!r} claims {parsed.metrics.num_examples} samples, more than the "
                    f"{enrolment.max_samples} usable slices of its signed manifest")
        return None
