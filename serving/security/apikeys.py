"""API keys: created once, shown once, stored only as salted SHA-256 hashes.

A key reads ``fsk_<id>_<secret>``: ``id`` (12 hex digits) finds the record, ``secret`` (256 random
bits) is checked against ``sha256(salt || secret)`` with a constant-time comparison. The store is
one JSON file (default ``$FEDSEG_HOME/serving/apikeys.json``, mode 0600), rewritten atomically
under a file lock; a running service rereads it when it changes, so a revoked key stops working
without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from imaging.home import fedseg_home

from ..errors import ApiKeyStoreError
from .principal import Principal
from .scopes import SCOPES

__all__ = ["ApiKey", "ApiKeyStore", "KEY_PREFIX", "default_key_file", "parse_scopes"]

KEY_PREFIX = "fsk_"
_KEY_RE = re.compile(r"^fsk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DUMMY_SALT = bytes(16)


def default_key_file() -> Path:
    """``$FEDSEG_HOME/serving/apikeys.json``."""
    return fedseg_home() / "serving" / "apikeys.json"


def parse_scopes(scopes: str | Iterable[str]) -> frozenset[str]:
    """``"predict,monitor"`` (or an iterable) -> a validated set of scopes."""
    items = scopes.replace(" ", ",").split(",") if isinstance(scopes, str) else list(scopes)
    found = frozenset(s.strip() for s in items if s.strip())
    unknown = sorted(found - set(SCOPES))
    if unknown:
        raise ApiKeyStoreError(
            f"unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}"
        )
    if not found:
        raise ApiKeyStoreError(f"give at least one scope ({', '.join(SCOPES)})")
    return found


def _hash(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One stored key (never the secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    salt: str
    hash: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None


class ApiKeyStore:
    """The key file: create, list, revoke, verify.

    Parameters
    ----------
    path : Path, optional
        The JSON file (default :func:`default_key_file`).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_key_file()
        self._cache: tuple[tuple[int, int], dict[str, ApiKey]] | None = None
        self._cache_lock = threading.Lock()

    # -------------------------------------------------------------------- file access

    def _read(self) -> dict[str, ApiKey]:
        try:
            raw = json.loads(self.path.read_text())
            return {k["id"]: ApiKey(**{**k, "scopes": tuple(k["scopes"])}) for k in raw["keys"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApiKeyStoreError(f"the API key store {self.path} cannot be read: {exc}") from None

    def _write(self, keys: dict[str, ApiKey]) -> None:
        body = json.dumps({"version": 1, "keys": [asdict(k) for k in keys.values()]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".apikeys.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, ApiKey]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        except OSError as exc:
            raise ApiKeyStoreError(f"cannot open the API key store {self.path}: {exc}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            self._write(keys)

    def _current(self) -> dict[str, ApiKey]:
        """The keys, reread only when the file changed (a service verifies on every request)."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ApiKeyStoreError(f"the API key store {self.path} cannot be read: {exc}") from None
        with self._cache_lock:
            if self._cache is None or self._cache[0] != stamp:
                self._cache = (stamp, self._read())
            return self._cache[1]

    # -------------------------------------------------------------------- operations

    def create(self, name: str, scopes: str | Iterable[str]) -> tuple[ApiKey, str]:
        """Store a new key; returns its record and the key itself (shown once, never stored)."""
        if not _NAME_RE.match(name):
            raise ApiKeyStoreError(
                f"key name {name!r} must be 1-64 characters: letters, digits, '.', '_', '@', '-'"
            )
        granted = tuple(s for s in SCOPES if s in parse_scopes(scopes))
        with self._locked() as keys:
            if any(k.name == name and k.active for k in keys.values()):
                raise ApiKeyStoreError(f"an active key named {name!r} exists; revoke it first")
            key_id = secrets.token_hex(6)
            while key_id in keys:  # pragma: no cover - 48 random bits
                key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            salt = secrets.token_bytes(16)
            record = ApiKey(
                id=key_id, name=name, scopes=granted, salt=salt.hex(), hash=_hash(salt, secret),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            keys[key_id] = record
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return sorted(self._read().values(), key=lambda k: k.created)

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke the active key with this name (or id)."""
        with self._locked() as keys:
            matches = [
                k for k in keys.values() if k.active and name_or_id in (k.name, k.id)
            ]
            if not matches:
                raise ApiKeyStoreError(f"no active API key named {name_or_id!r}")
            revoked = ApiKey(**{**asdict(matches[0]),
                                "revoked": datetime.now(UTC).isoformat(timespec="seconds")})
            keys[revoked.id] = revoked
        return revoked

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid, active key; None for anything else."""
        match = _KEY_RE.match(token)
        record = self._current().get(match.group(1)) if match else None
        secret = match.group(2) if match else ""
        salt = bytes.fromhex(record.salt) if record else _DUMMY_SALT
        # hash and compare even for an unknown id, so timing does not tell ids apart
        ok = hmac.compare_digest(_hash(salt, secret), record.hash if record else "0" * 64)
        if not (ok and record is not None and record.active):
            return None
        return Principal(name=record.name, method="apikey", scopes=frozenset(record.scopes))
