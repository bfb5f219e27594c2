"""Who made a request, as the auth layer established it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Principal"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes
    ----------
    name : str
        The API key's name, or the JWT's ``sub``.
    method : str
        ``"apikey"`` or ``"jwt"``.
    scopes : frozenset[str]
        What the credential grants.
    """

    name: str
    method: str
    scopes: frozenset[str]
