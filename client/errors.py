"""The client package's exception tree."""

from __future__ import annotations

__all__ = [
    "ClientError",
    "SiteConfigError",
    "PolicyError",
    "PolicyViolation",
    "AppRefused",
    "RunnerError",
    "AuditError",
    "SourceError",
    "PacsError",
    "PacsAuthError",
    "NoPatientsError",
]


class ClientError(Exception):
    """Base class of every error raised by :mod:`client`."""


class SiteConfigError(ClientError, ValueError):
    """The node config does not say where the site's data is, or says it wrongly."""


class PolicyError(ClientError, ValueError):
    """The site's policy file cannot be read or holds a bad value."""


class PolicyViolation(ClientError):
    """The round asks for something the site's policy forbids; the message names the rule.

    ``rule`` is the policy key broken (``privacy.require_dp``, ``apps.allowed_hashes``, ...).
    """

    def __init__(self, message: str, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


class AppRefused(PolicyViolation):
    """The site runner refused a task's app package (FAB) before any of it ran."""


class RunnerError(ClientError):
    """The site runner cannot start: a bad policy, or a Flower it cannot wrap safely."""


class AuditError(ClientError):
    """The site's audit log cannot be written or read, or its hash chain is broken."""


class SourceError(ClientError):
    """A site's data source (DICOM folder or PACS) cannot be read."""


class PacsError(SourceError):
    """The PACS cannot be reached or answers with an error; the message names the request.

    ``status`` is the HTTP status of an error answer (None: unreachable, or a malformed answer).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PacsAuthError(PacsError):
    """The PACS refused the node's credentials (HTTP 401 or 403)."""


class NoPatientsError(ClientError):
    """The site's patient split leaves no patient for the round's ``role`` (training, held-out)."""

    def __init__(self, message: str, *, role: str, patients: int) -> None:
        super().__init__(message)
        self.role, self.patients = role, patients
