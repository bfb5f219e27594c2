"""Wire the security layer into an app: middlewares and the OpenAPI security scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..settings import ServingSettings
from .apikeys import ApiKeyStore
from .audit import AuditMiddleware
from .jwt_auth import JwtVerifier
from .middleware import Authenticator, AuthMiddleware, BodyLimitMiddleware
from .scopes import required_scope

__all__ = ["install_security", "authenticator_for"]

SCHEME = "bearer"
_HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def authenticator_for(settings: ServingSettings) -> Authenticator | None:
    """The authenticator the settings ask for; None when auth is off.

    Raises
    ------
    AuthConfigError
        The JWT key file cannot be read or an algorithm is refused.
    """
    methods = settings.auth_methods
    if not methods:
        return None
    apikeys = ApiKeyStore(settings.apikey_file) if "apikey" in methods else None
    verifier = None
    if "jwt" in methods:
        assert settings.jwt_key_file and settings.jwt_issuer and settings.jwt_audience  # settings check
        verifier = JwtVerifier(
            settings.jwt_key_file, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
            algorithms=[a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()],
        )
    return Authenticator(apikeys, verifier)


def install_security(app: FastAPI, settings: ServingSettings) -> None:
    """Add the body limit, authentication and audit middlewares, and document the scheme.

    Call after the app's other middlewares: the audit line (outermost) then sees every answer,
    401 and 413 included; authentication runs before the body limit, so an unauthenticated
    request is refused without reading anything.
    """
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    authenticator = authenticator_for(settings)
    if authenticator is not None:
        app.add_middleware(AuthMiddleware, authenticator=authenticator)
        _document(app, authenticator.methods)
    app.add_middleware(AuditMiddleware)


def _document(app: FastAPI, methods: tuple[str, ...]) -> None:
    """Add the bearer scheme, each protected operation's scope and its 401/403 to the schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": f"{' or '.join(methods)}: `Authorization: Bearer <token>`; scopes "
                           "predict, monitor, admin (admin grants all)",
        }
        for path, operations in schema.get("paths", {}).items():
            scope = required_scope(path.split("{", 1)[0].rstrip("/") or "/")
            if scope is None:
                continue
            for method, operation in operations.items():
                if method not in _HTTP_METHODS:
                    continue
                operation["security"] = [{SCHEME: [scope]}]
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"description": "no or invalid credentials"})
                responses.setdefault("403", {"description": f"the credential lacks the scope {scope!r}"})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
