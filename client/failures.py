"""The ClientApp's one exit for failures: a coded error reply; the full text stays at the site.

Every exception a round raises, in the handlers or in any mod, ends in :func:`failure_reply`,
called by :func:`failure_edge`, the ClientApp's outermost mod (its edge). It

1. classifies the exception into one of :data:`imaging.failure_codes.FAILURE_CODES`, taking
   only allow-listed values from it (counts, numbers, rule names, fixed words);
2. writes the full text (type, message, traceback) to the site's log, and the code, the ref and
   the full message to the site's audit log (``refusal`` for a policy rule, ``failure`` else);
3. answers with a Flower error reply whose reason is the rendered code, nothing else.

An exception that no rule below classifies, or whose values a template refuses, becomes
``FEDSEG-INTERNAL``: its text never leaves the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from imaging.errors import ConfigError, ImagingError, NoUsableSeriesError
from imaging.failure_codes import UnsafeFailureValue, new_failure_ref, render_failure
from privacy import BudgetExceededError
from privacy.errors import LedgerError, LedgerIntegrityError, PrivacyConfigError

from .audit import AuditLog
from .errors import (
    AuditError,
    NoPatientsError,
    PacsAuthError,
    PacsError,
    PolicyError,
    PolicyViolation,
    SiteConfigError,
    SourceError,
)
from .handlers import open_site, round_of
from .site import SiteResolver

__all__ = ["INTERNAL", "classify_failure", "failure_edge", "failure_reply"]

log = logging.getLogger("fedseg.client")

INTERNAL = "FEDSEG-INTERNAL"
_Values = dict[str, Any]


def _refusal_rule(exc: BaseException) -> str:
    default = "privacy.ledger" if isinstance(exc, LedgerIntegrityError) else "privacy.epsilon_budget"
    return getattr(exc, "rule", "") or default


def _budget(exc: BudgetExceededError) -> _Values:
    return {"rule": _refusal_rule(exc), "projected": exc.projected, "budget": exc.budget,
            "remaining": exc.remaining}


def _pacs(exc: PacsError) -> tuple[str, _Values]:
    if exc.status is not None:
        return "FEDSEG-PACS-002", {"status": exc.status}
    if isinstance(exc.__cause__, httpx.TransportError):
        return "FEDSEG-PACS-001", {}
    return "FEDSEG-PACS-004", {}


def _no_series(exc: NoUsableSeriesError) -> _Values:
    return {"labelled": exc.labelled, "unlabelled": exc.unlabelled, "excluded": exc.excluded,
            "unusable": sum(exc.problems.values()), "problems": exc.problems}


#: (exception type, code and values from it): the first matching type wins (subclasses first).
_RULES: tuple[tuple[type[BaseException], Callable[[Any], tuple[str, _Values]]], ...] = (
    (PolicyViolation, lambda e: ("FEDSEG-POLICY-001", {"rule": e.rule})),
    (BudgetExceededError, lambda e: ("FEDSEG-PRIVACY-001", _budget(e))),
    (PolicyError, lambda e: ("FEDSEG-POLICY-002", {})),
    (PrivacyConfigError, lambda e: ("FEDSEG-PRIVACY-002", {})),
    (LedgerIntegrityError, lambda e: ("FEDSEG-PRIVACY-004", {"rule": _refusal_rule(e)})),
    (LedgerError, lambda e: ("FEDSEG-PRIVACY-003", {})),
    (AuditError, lambda e: ("FEDSEG-AUDIT-001", {})),
    (SiteConfigError, lambda e: ("FEDSEG-SITE-001", {})),
    (PacsAuthError, lambda e: ("FEDSEG-PACS-003", {"status": e.status})),
    (PacsError, _pacs),
    (SourceError, lambda e: ("FEDSEG-SOURCE-001", {})),
    (NoUsableSeriesError, lambda e: ("FEDSEG-DATA-001", _no_series(e))),
    (NoPatientsError, lambda e: ("FEDSEG-DATA-002", {"role": e.role, "patients": e.patients})),
    (ConfigError, lambda e: ("FEDSEG-ROUND-001", {})),
    (ImagingError, lambda e: ("FEDSEG-DATA-003", {})),
)
_REFUSALS = (PolicyViolation, BudgetExceededError, LedgerIntegrityError)


def classify_failure(exc: BaseException) -> tuple[str, _Values]:
    """The code and the template's values for ``exc``; ``FEDSEG-INTERNAL`` for anything else."""
    for kind, values_of in _RULES:
        if isinstance(exc, kind):
            return values_of(exc)
    return INTERNAL, {}


def _render(exc: BaseException, ref: str) -> tuple[str, str]:
    code, values = classify_failure(exc)
    try:
        return code, render_failure(code, ref=ref, **values)
    except (UnsafeFailureValue, AttributeError, TypeError):  # a value the template refuses
        log.error("failure %s: %s refused a value of %s; sending %s instead", ref, code,
                  type(exc).__name__, INTERNAL)
        return INTERNAL, render_failure(INTERNAL, ref=ref)


def failure_reply(message: Message, exc: Exception, *, audit: AuditLog | None,
                  where: Mapping[str, Any], site: str = "") -> Message:
    """Log and audit ``exc`` in full; the error reply that carries only its code's text."""
    ref = new_failure_ref()
    code, sent = _render(exc, ref)
    full = f"{type(exc).__name__}: {exc}"
    refusal = isinstance(exc, _REFUSALS)
    # the site's own log: everything, with the traceback of an unexpected failure
    log.log(logging.WARNING if refusal else logging.ERROR, "site %s %s round %s: %s (%s, ref %s): %s",
            site or "?", where.get("kind"), where.get("round"), "refused" if refusal else "failed",
            code, ref, full, exc_info=None if refusal else exc)
    if audit is not None:
        fields: dict[str, Any] = {**where, "code": code, "ref": ref, "sent": sent, "reason": str(exc)[:4000]}
        try:
            if refusal:
                audit.append("refusal", **fields, rule=_refusal_rule(exc))
            else:
                audit.append("failure", **fields, error=type(exc).__name__)
        except (AuditError, OSError) as audit_exc:  # the reply still goes; the site log has it all
            log.error("failure %s could not be written to the audit log: %s", ref, audit_exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=sent), reply_to=message)


def failure_edge(resolve_site: SiteResolver) -> Mod:
    """The ClientApp's outermost mod: any exception below it becomes :func:`failure_reply`."""

    def edge(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(message, context)
        except Exception as exc:  # noqa: BLE001 - the one place every failure is turned into a code
            kind = str(message.metadata.message_type).split(".")[0]
            where = {"run_id": str(message.metadata.run_id), "round": round_of(message), "kind": kind}
            try:  # the site's audit log, if the site can be resolved at all
                site, _, audit = open_site(context.node_config, resolve_site)
            except Exception:  # noqa: BLE001 - then the site's log alone keeps it
                return failure_reply(message, exc, audit=None, where=where)
            return failure_reply(message, exc, audit=audit, where=where, site=site.name)

    return edge
