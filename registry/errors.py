"""The registry package's exception tree."""

from __future__ import annotations

__all__ = ["RegistryError", "ModelUriError", "ModelNotFoundError", "ModelArtifactError"]


class RegistryError(Exception):
    """Base class of every error raised by :mod:`registry`."""


class ModelUriError(RegistryError, ValueError):
    """A model URI is not ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""


class ModelNotFoundError(RegistryError, LookupError):
    """No registered model, version or alias matches."""


class ModelArtifactError(RegistryError):
    """A registered version lacks its weights or spec, or they do not load."""
