"""The registry package's exception tree."""

from __future__ import annotations

__all__ = [
    "RegistryError",
    "ModelUriError",
    "ModelNotFoundError",
    "ModelArtifactError",
    "GateError",
    "PromotionRefusedError",
    "DossierError",
    "CommentError",
    "ModelSignatureError",
    "EvidenceError",
    "SigningKeyError",
]


class RegistryError(Exception):
    """Base class of every error raised by :mod:`registry`."""


class ModelUriError(RegistryError, ValueError):
    """A model URI is not ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""


class ModelNotFoundError(RegistryError, LookupError):
    """No registered model, version or alias matches."""


class ModelArtifactError(RegistryError):
    """A registered version lacks its weights or spec, or they do not load."""


class GateError(RegistryError, ValueError):
    """A promotion gate is malformed (wrong type, out of range, unreadable gates file)."""


class PromotionRefusedError(RegistryError):
    """A promotion or rollback is refused (gates fail, already champion, nothing to roll back)."""


class DossierError(RegistryError):
    """A governance dossier cannot be built or logged for a version."""


class CommentError(RegistryError, ValueError):
    """A data scientist's comment is refused (empty or too long)."""


class ModelSignatureError(RegistryError):
    """A model's signature is missing, does not verify, or is by a key that is not trusted.

    The message says why: ``unsigned``, ``altered``, ``signature does not verify``,
    ``signed by untrusted key``, or ``no trusted keys configured``.
    """


class EvidenceError(ModelSignatureError):
    """A version's signed evidence is missing, in the old format, or differs from the registry.

    The message names each difference: a tag (``tag eval_sites differs from the signed
    evidence``), the model, version or run it was signed for, the model files, the dossier.
    """


class SigningKeyError(RegistryError):
    """The consortium signing key cannot be read, created or decrypted."""
