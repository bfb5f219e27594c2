"""The client package's exception tree."""

from __future__ import annotations

__all__ = ["ClientError", "SiteConfigError"]


class ClientError(Exception):
    """Base class of every error raised by :mod:`client`."""


class SiteConfigError(ClientError, ValueError):
    """The node config does not say where the site's data is, or says it wrongly."""
