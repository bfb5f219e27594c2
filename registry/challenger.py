"""Setting and clearing the ``challenger`` alias: the version a canary sends a share of studies to.

The serving service follows ``models:/NAME@challenger`` while its canary share is above 0
(:mod:`serving.models`): setting the alias loads and warms that version and then routes the
canary's studies to it; clearing it unloads the challenger on the service's next registry check
and sends every study to the champion. Neither needs a restart.

Every change is recorded like a champion move (:mod:`registry.promotion`), but in its own
history, so that a rollback of the champion never walks into a challenger: the registered model's
tag ``fedseg.challenger_history`` is a JSON list, oldest first, of::

    {"action": "set" | "clear", "version": 3, "previous": 2, "champion": 1,
     "time": "2026-01-02T03:04:05+00:00", "actor": "alice", "reason": "..."}

``version`` is the challenger after the entry (None after a clear), ``previous`` the one before,
``champion`` the champion at that moment. The version set gets the tags ``challenger_set_at`` and
``challenger_set_by``; the version cleared gets ``challenger_cleared_at`` and
``challenger_cleared_by``.

A version is refused as challenger when it does not exist, is the champion, or is already the
challenger. Like :func:`registry.promotion.promote`, no signature check happens here: the service
verifies the signature when it loads the version and keeps serving the champion alone when it
does not verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import ModelNotFoundError, PromotionRefusedError
from .history import append_history, read_history
from .load import lookup_error, resolve_version
from .promotion import _login
from .publish import CHAMPION
from .store import RegistryStore

__all__ = [
    "CHALLENGER",
    "CHALLENGER_HISTORY_TAG",
    "ChallengerRefusedError",
    "ChallengerResult",
    "clear_challenger",
    "read_challenger_history",
    "resolve_alias_version",
    "set_challenger",
]

CHALLENGER = "challenger"
CHALLENGER_HISTORY_TAG = "fedseg.challenger_history"


class ChallengerRefusedError(PromotionRefusedError):
    """Setting or clearing the challenger is refused (the champion, already set, none to clear)."""


@dataclass(frozen=True)
class ChallengerResult:
    """What :func:`set_challenger` or :func:`clear_challenger` did.

    Attributes
    ----------
    name : str
        Registered model.
    action : str
        ``"set"`` or ``"clear"``.
    version : int or None
        The challenger now (None after a clear).
    previous : int or None
        The challenger before (None when there was none).
    champion : int or None
        The champion at that moment.
    entry : dict
        The history entry that was appended.
    """

    name: str
    action: str
    version: int | None
    previous: int | None
    champion: int | None
    entry: dict[str, Any] = field(default_factory=dict)


def set_challenger(
    store: RegistryStore,
    name: str,
    version: int,
    *,
    reason: str | None = None,
    actor: str | None = None,
) -> ChallengerResult:
    """Point ``challenger`` at ``version`` of ``name`` and record who did it, when and why.

    Raises
    ------
    ModelNotFoundError
        No such model or version.
    ChallengerRefusedError
        ``version`` is the champion, or already the challenger.
    """
    aliases = _aliases(store, name)  # first: an unknown model is named as such
    version = int(version)
    try:
        store.client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"models:/{name}/{version} is not in the registry at {store.tracking_uri}; "
            f"see `fedseg registry list --name {name}`"
        ) from exc
    champion, previous = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if champion == version:
        raise ChallengerRefusedError(
            f"refusing to make {name} v{version} the {CHALLENGER}: it is the {CHAMPION}; "
            "a canary must compare two different versions"
        )
    if previous == version:
        raise ChallengerRefusedError(f"{name} v{version} is already the {CHALLENGER}")
    store.client().set_registered_model_alias(name, CHALLENGER, str(version))
    entry = _record(store, name, "set", version, previous, champion, actor, reason)
    _tag(store, name, version, "set", entry)
    return ChallengerResult(name, "set", version, previous, champion, entry)


def clear_challenger(
    store: RegistryStore, name: str, *, reason: str | None = None, actor: str | None = None
) -> ChallengerResult:
    """Remove the ``challenger`` alias of ``name`` and record who did it, when and why.

    Raises
    ------
    ModelNotFoundError
        No such model.
    ChallengerRefusedError
        ``name`` has no challenger.
    """
    aliases = _aliases(store, name)
    previous = aliases.get(CHALLENGER)
    if previous is None:
        raise ChallengerRefusedError(f"{name} has no {CHALLENGER} alias; nothing to clear")
    store.client().delete_registered_model_alias(name, CHALLENGER)
    entry = _record(store, name, "clear", None, previous, aliases.get(CHAMPION), actor, reason)
    try:
        _tag(store, name, previous, "clear", entry)
    except MlflowException:  # the version was deleted after it became the challenger
        pass
    return ChallengerResult(name, "clear", None, previous, aliases.get(CHAMPION), entry)


def read_challenger_history(store: RegistryStore, name: str) -> list[dict[str, Any]]:
    """The model's challenger history, oldest first (empty when it has none).

    Raises
    ------
    ModelNotFoundError
        No registered model is called ``name``.
    RegistryError
        The tag exists but is not a JSON list of entries.
    """
    return read_history(store, name, CHALLENGER_HISTORY_TAG)


def resolve_alias_version(store: RegistryStore, uri: str) -> int:
    """The version number a ``models:/`` URI names now (see :func:`registry.load.resolve_version`)."""
    return int(resolve_version(store, uri).version)


# ---------------------------------------------------------------------------- helpers


def _model(store: RegistryStore, name: str):  # -> mlflow RegisteredModel
    try:
        return store.client().get_registered_model(name)
    except MlflowException as exc:
        raise lookup_error(exc, f"no registered model {name!r} at {store.tracking_uri}") from exc


def _aliases(store: RegistryStore, name: str) -> dict[str, int]:
    return {alias: int(v) for alias, v in (_model(store, name).aliases or {}).items()}


def _record(
    store: RegistryStore,
    name: str,
    action: str,
    version: int | None,
    previous: int | None,
    champion: int | None,
    actor: str | None,
    reason: str | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "action": action,
        "version": version,
        "previous": previous,
        "champion": champion,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "actor": actor or _login(),
        "reason": reason.strip() if reason and reason.strip() else None,
    }
    append_history(store, name, entry, CHALLENGER_HISTORY_TAG)
    return entry


def _tag(store: RegistryStore, name: str, version: int, verb: str, entry: dict[str, Any]) -> None:
    client = store.client()
    done = {"set": "set", "clear": "cleared"}[verb]
    client.set_model_version_tag(name, str(version), f"challenger_{done}_at", entry["time"])
    client.set_model_version_tag(name, str(version), f"challenger_{done}_by", entry["actor"])
