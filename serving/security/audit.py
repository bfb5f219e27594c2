"""One audit line per request, without patient data.

:class:`AuditMiddleware` writes a JSON object per HTTP request to the logger
``fedseg.serving.audit``: time, principal (API key name or JWT subject), method, route template
(never the raw path), status, model version, bytes in and out, duration, and the StudyInstanceUID
as a keyed hash (HMAC-SHA256 with a per-deployment salt, truncated): the same study gives the same
value within a deployment, and nothing that identifies a patient is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imaging.home import fedseg_home

from ..metrics import answered_version
from .principal import Principal
from .scopes import OPEN_PATHS, SCOPE_RULES

__all__ = ["AUDIT_LOGGER", "AuditMiddleware", "note_principal", "note_study", "load_salt", "hash_uid"]

AUDIT_LOGGER = "fedseg.serving.audit"
UNMATCHED_ROUTE = "<unmatched>"

audit_log = logging.getLogger(AUDIT_LOGGER)
_record: ContextVar[dict[str, Any] | None] = ContextVar("fedseg_audit_record", default=None)


def load_salt(path: Path | None = None) -> bytes:
    """The deployment's hashing salt (``$FEDSEG_HOME/serving/audit.salt``, created once)."""
    path = path or fedseg_home() / "serving" / "audit.salt"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        salt = secrets.token_bytes(32)
        path.write_text(salt.hex())
        path.chmod(0o600)
        return salt


def hash_uid(salt: bytes, uid: str) -> str:
    """A pseudonym of a DICOM UID: 16 hex digits of HMAC-SHA256."""
    return hmac.new(salt, uid.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]


def note_study(study_uid: str) -> None:
    """Record the current request's StudyInstanceUID (hashed before it is written)."""
    record = _record.get()
    if record is not None and study_uid and "study" not in record:
        record["study"] = study_uid


def note_principal(principal: Principal) -> None:
    """Record who the current request's caller is."""
    record = _record.get()
    if record is not None:
        record["principal"] = principal.name
        record["auth"] = principal.method


def _route(scope: Scope) -> str:
    """The matched route's template; for a request refused before routing, the policy prefix."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    if isinstance(path, str) and path:
        return path
    raw = str(scope.get("path", ""))
    known = [p for p, _ in SCOPE_RULES] + [p for p in OPEN_PATHS if p != "/"]
    return next((p for p in known if raw == p or raw.startswith(p + "/")), UNMATCHED_ROUTE)


class AuditMiddleware:
    """Pure ASGI middleware writing one JSON audit line per HTTP request.

    Parameters
    ----------
    app : ASGI app
    salt : bytes, optional
        Key of the StudyInstanceUID hash; default :func:`load_salt`, read when first needed.
    """

    def __init__(self, app: ASGIApp, *, salt: bytes | None = None) -> None:
        self.app = app
        self._salt = salt

    @property
    def salt(self) -> bytes:
        if self._salt is None:
            self._salt = load_salt()
        return self._salt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "principal": None, "auth": None, "status": 500, "model_version": None,
            "bytes_in": 0, "bytes_out": 0,
        }
        token = _record.set(record)

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                record["bytes_in"] += len(message.get("body", b""))
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = int(message["status"])
                record["model_version"] = answered_version(message)
            elif message["type"] == "http.response.body":
                record["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        finally:
            _record.reset(token)
            study = record.pop("study", None)
            line = {
                "time": record["time"],
                "principal": record["principal"],
                "auth": record["auth"],
                "method": scope.get("method", ""),
                "route": _route(scope),
                "status": record["status"],
                "model_version": record["model_version"],
                "bytes_in": record["bytes_in"],
                "bytes_out": record["bytes_out"],
                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                "study": hash_uid(self.salt, study) if study else None,
            }
            audit_log.info(json.dumps(line, separators=(",", ":")))
