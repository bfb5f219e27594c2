"""The privacy ledger's heads, anchored in the site's hash-chained audit log.

After every DP round the ledger's new head (entry count and hash) is appended to the audit log
as a ``ledger-anchor`` record; every later load of the ledger checks that each anchored head is
still in its chain. A deleted ledger (anchors present, no file), a truncated or rolled-back one
(fewer entries), or one rewritten from a backup of another state (another hash) is refused with
:class:`privacy.LedgerIntegrityError`, never reset. Removing anchors means editing the audit
log, which breaks its own chain (``fedseg site audit verify``).
"""

from __future__ import annotations

from dataclasses import dataclass

from privacy import LedgerHead, PrivacyLedger

from .audit import AuditLog
from .site import Site

__all__ = ["ANCHOR_EVENT", "AuditLedgerAnchor", "site_ledger"]

ANCHOR_EVENT = "ledger-anchor"


@dataclass(frozen=True)
class AuditLedgerAnchor:
    """:class:`privacy.LedgerAnchor` over the site's audit log."""

    audit: AuditLog

    def anchored(self) -> list[LedgerHead]:
        return [LedgerHead(int(r["entries"]), str(r["head"])) for r in self.audit.find_all(ANCHOR_EVENT)]

    def anchor(self, head: LedgerHead) -> None:
        self.audit.append(ANCHOR_EVENT, entries=head.entries, head=head.hash)


def site_ledger(site: Site, audit: AuditLog) -> PrivacyLedger:
    """The site's ledger, checked against (and anchoring in) its audit log."""
    return PrivacyLedger(site.ledger_path, anchor=AuditLedgerAnchor(audit))
