"""Data scientists' comments on a registered version, kept as model-version tags.

Each comment is the tag ``fedseg.comment.<NNNN>`` holding JSON ``{author, time, text}`` (time in
UTC, ISO 8601), so it lives in the registry next to the version and survives any copy of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .errors import CommentError, ModelNotFoundError
from .store import RegistryStore

__all__ = ["Comment", "COMMENT_TAG_PREFIX", "MAX_COMMENT_CHARS", "add_comment", "list_comments", "comments_from_tags"]

COMMENT_TAG_PREFIX = "fedseg.comment."
MAX_COMMENT_CHARS = 5000
MAX_AUTHOR_CHARS = 200
_TAG = re.compile(rf"^{re.escape(COMMENT_TAG_PREFIX)}(\d+)$")
_RETRIES = 5


@dataclass(frozen=True)
class Comment:
    number: int
    author: str
    time: str  # UTC, ISO 8601
    text: str


def add_comment(
    store: RegistryStore,
    name: str,
    version: int,
    author: str,
    text: str,
    *,
    now: datetime | None = None,
) -> Comment:
    """Store a comment on ``name`` v``version`` and return it with its number.

    Raises
    ------
    CommentError
        Empty text or author, or text over :data:`MAX_COMMENT_CHARS` characters.
    ModelNotFoundError
        No such model version.
    """
    text, author = text.strip(), author.strip()
    if not text:
        raise CommentError("a comment needs some text")
    if len(text) > MAX_COMMENT_CHARS:
        raise CommentError(f"a comment is at most {MAX_COMMENT_CHARS} characters, got {len(text)}")
    if not author:
        raise CommentError("a comment needs an author")
    if len(author) > MAX_AUTHOR_CHARS:
        raise CommentError(f"an author name is at most {MAX_AUTHOR_CHARS} characters")
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")
    value = json.dumps({"author": author, "time": when, "text": text}, ensure_ascii=False, sort_keys=True)
    client = store.client()
    for _ in range(_RETRIES):
        number = max((c.number for c in _read(client, name, version)), default=0) + 1
        key = f"{COMMENT_TAG_PREFIX}{number:04d}"
        client.set_model_version_tag(name, str(version), key, value)
        # Two writers may pick the same number: the one whose value was overwritten tries again.
        if _tags(client, name, version).get(key) == value:
            return Comment(number, author, when, text)
    raise CommentError(f"could not store the comment on {name} v{version}: too many concurrent writers")


def list_comments(store: RegistryStore, name: str, version: int) -> list[Comment]:
    """The version's comments, oldest first (by number)."""
    return _read(store.client(), name, version)


def comments_from_tags(tags: dict[str, str]) -> list[Comment]:
    """Decode the comment tags among a version's tags; malformed ones are shown, not dropped."""
    found = []
    for key, raw in tags.items():
        match = _TAG.match(key)
        if not match:
            continue
        try:
            data = json.loads(raw)
            comment = Comment(int(match[1]), str(data["author"]), str(data["time"]), str(data["text"]))
        except (ValueError, KeyError, TypeError):
            comment = Comment(int(match[1]), "?", "?", f"(unreadable comment tag {key}) {raw}")
        found.append(comment)
    return sorted(found, key=lambda c: c.number)


def _read(client: MlflowClient, name: str, version: int) -> list[Comment]:
    return comments_from_tags(_tags(client, name, version))


def _tags(client: MlflowClient, name: str, version: int) -> dict[str, str]:
    try:
        return dict(client.get_model_version(name, str(version)).tags)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no version {version} of registered model {name!r}") from exc
