"""The server package's exception tree."""

from __future__ import annotations

__all__ = ["ServerError", "RunConfigError", "FederationError", "JournalError", "GatewayError"]


class ServerError(Exception):
    """Base class of every error raised by :mod:`server`."""


class RunConfigError(ServerError, ValueError):
    """The Flower run config is missing a key or holds a bad value."""


class FederationError(ServerError):
    """The federation produced no model (no site replied, every round failed...)."""


class JournalError(ServerError):
    """A run journal is missing, damaged, or cannot be resumed as asked."""


class GatewayError(ServerError, ValueError):
    """The coordinator's gateway or the operator's tunnel cannot be configured or started as
    asked (a SuperLink off loopback, clashing ports, an unreadable certificate...)."""
