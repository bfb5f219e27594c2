"""Pure ASGI middlewares: bearer authentication and the request body limit.

Both act before any route reads the body: an unauthenticated request is answered 401 without
reading it, a request whose ``Content-Length`` exceeds the limit 413 without reading it, and a
chunked body is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiKeyStoreError, AuthenticationError, UploadTooLargeError
from .apikeys import KEY_PREFIX, ApiKeyStore
from .audit import note_principal
from .jwt_auth import JwtVerifier
from .principal import Principal
from .scopes import grants, required_scope

__all__ = ["Authenticator", "AuthMiddleware", "BodyLimitMiddleware", "BodyTooLargeError"]

log = logging.getLogger(__name__)
REALM = "fedseg"


async def _send_json(send: Send, status: int, detail: str,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")[:200]


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, by API key or by JWT.

    API keys start with ``fsk_``; anything else is treated as a JWT (when JWTs are enabled).
    """

    def __init__(self, apikeys: ApiKeyStore | None, jwt: JwtVerifier | None) -> None:
        self.apikeys, self.jwt = apikeys, jwt

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m, v in (("apikey", self.apikeys), ("jwt", self.jwt)) if v is not None)

    def authenticate(self, token: str) -> Principal:
        """The caller, or :class:`AuthenticationError` (:class:`ApiKeyStoreError` if the store is broken)."""
        if token.startswith(KEY_PREFIX) and self.apikeys is not None:
            principal = self.apikeys.verify(token)
            if principal is None:
                raise AuthenticationError("unknown or revoked API key")
            return principal
        if self.jwt is not None:
            return self.jwt.verify(token)
        raise AuthenticationError("not an API key (they start with fsk_)")


class AuthMiddleware:
    """Require ``Authorization: Bearer <token>`` with the scope that the path needs.

    Open paths (:data:`serving.security.scopes.OPEN_PATHS`) pass untouched. The principal is put
    in ``request.state.principal`` and in the audit line.
    """

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if not header:
            await _send_json(
                send, 401,
                f"authentication required: send 'Authorization: Bearer <key>' "
                f"({' or '.join(self.auth.methods)})",
                ((b"www-authenticate", f'Bearer realm="{REALM}"'.encode()),),
            )
            return
        try:
            if scheme.lower() != "bearer" or not token:
                raise AuthenticationError("the Authorization header must read 'Bearer <token>'")
            principal = self.auth.authenticate(token)
        except AuthenticationError as exc:
            challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{_quoted(str(exc))}"'
            await _send_json(send, 401, str(exc), ((b"www-authenticate", challenge.encode()),))
            return
        except ApiKeyStoreError as exc:
            log.error("%s", exc)
            await _send_json(send, 503, "the API key store cannot be read; see the service log")
            return
        note_principal(principal)
        if not grants(principal.scopes, needed):
            challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{needed}"'
            await _send_json(
                send, 403,
                f"{principal.name} lacks the scope {needed!r} that {scope['path']} needs "
                f"(it has: {', '.join(sorted(principal.scopes)) or 'none'})",
                ((b"www-authenticate", challenge.encode()),),
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class BodyTooLargeError(UploadTooLargeError):
    """Raised from ``receive`` when a body streams past the limit."""


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: from ``Content-Length`` before reading, else while reading.

    When a chunked body passes the limit, ``receive`` raises :class:`BodyTooLargeError` (an
    :class:`~serving.errors.UploadTooLargeError`, so routes map it to 413 too) and the response,
    whatever the route made of the error, is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, setting: str = "FEDSEG_SERVE_MAX_UPLOAD_MB") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    def _message(self, amount: str) -> str:
        mib = 1024 * 1024
        return (f"request body limit: {amount} exceeds the limit of {self.max_bytes / mib:.0f} MiB "
                f"({self.setting})")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                declared = value.decode("latin-1").strip()
                if not declared.isdigit():
                    await _send_json(send, 400, f"Content-Length {declared[:32]!r} is not a number")
                    return
                if int(declared) > self.max_bytes:
                    await _send_json(
                        send, 413, self._message(f"Content-Length {int(declared) / 1024 / 1024:.1f} MiB")
                    )
                    return
        state = {"received": 0, "over": False, "started": False}

        async def receiving() -> Message:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise BodyTooLargeError(self._message("the body"))
            return message

        async def sending(message: Message) -> None:
            if state["over"] and not state["started"]:
                return  # the 413 below replaces whatever the app answers
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await _send_json(send, 413, self._message(f"more than {self.max_bytes / 1024 / 1024:.1f} MiB"))
