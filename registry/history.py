"""The champion history: who moved the ``champion`` alias, when, why, under which gates.

The history is a JSON list kept in the registered model's tag ``fedseg.champion_history``. Each
entry is a dict::

    {"action": "promote" | "auto" | "rollback", "version": 3, "previous": 2,
     "time": "2026-01-02T03:04:05+00:00", "actor": "alice", "reason": "...", "forced": false,
     "gates": [{"name": ..., "passed": ..., "detail": ...}, ...]}

``version`` is the champion after the entry, ``previous`` the one before (None when there was
none). The tag is rewritten whole on each change (read, append, write): two operators promoting
the same model at the same instant can lose an entry, which the alias itself never does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import ModelNotFoundError, RegistryError
from .store import RegistryStore

__all__ = ["HISTORY_TAG", "read_history", "append_history", "champion_chain"]

HISTORY_TAG = "fedseg.champion_history"
_MAX_CHARS = 90_000  # MLflow caps a registry tag value at 100,000 characters


def read_history(store: RegistryStore, name: str, tag: str = HISTORY_TAG) -> list[dict[str, Any]]:
    """The model's champion history (or the history in ``tag``), oldest first (empty when none).

    Raises
    ------
    ModelNotFoundError
        No registered model is called ``name``.
    RegistryError
        The tag exists but is not a JSON list.
    """
    try:
        model = store.client().get_registered_model(name)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no registered model {name!r} at {store.tracking_uri}") from exc
    raw = (model.tags or {}).get(tag)
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise RegistryError(f"tag {tag} of {name!r} is not JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(f"tag {tag} of {name!r} is not a JSON list of entries")
    return entries


def append_history(
    store: RegistryStore, name: str, entry: Mapping[str, Any], tag: str = HISTORY_TAG
) -> list[dict[str, Any]]:
    """Append ``entry`` to the model's history in ``tag`` and write it back; returns the new history.

    When the JSON would exceed MLflow's tag size limit, the oldest entries are dropped.
    """
    entries = [*read_history(store, name, tag), dict(entry)]
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    while len(text) > _MAX_CHARS and len(entries) > 1:
        entries = entries[1:]
        text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    store.client().set_registered_model_tag(name, tag, text)
    return entries


def champion_chain(entries: Sequence[Mapping[str, Any]]) -> list[int]:
    """Replay the history into the stack of champions, the current one last.

    A promotion pushes its version (after its ``previous`` when that is not already on top); a
    rollback pops the champion it demoted. So repeated rollbacks walk back through earlier
    champions instead of toggling between two.
    """
    stack: list[int] = []
    for entry in entries:
        version = int(entry["version"])
        previous = entry.get("previous")
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
            continue
        if previous is not None and (not stack or stack[-1] != int(previous)):
            stack.append(int(previous))
        stack.append(version)
    return stack
