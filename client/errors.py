"""The client package's exception tree."""

from __future__ import annotations

__all__ = ["ClientError", "SiteConfigError", "PolicyError", "PolicyViolation"]


class ClientError(Exception):
    """Base class of every error raised by :mod:`client`."""


class SiteConfigError(ClientError, ValueError):
    """The node config does not say where the site's data is, or says it wrongly."""


class PolicyError(ClientError, ValueError):
    """The site's policy file cannot be read or holds a bad value."""


class PolicyViolation(ClientError):
    """The round asks for something the site's policy forbids; the message names the rule."""
