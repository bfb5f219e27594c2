"""Who may call the service, and what it accepts: API keys, JWTs, scopes, body limit, audit.

See :mod:`serving.security.scopes` for the access policy and :mod:`serving.uploads` for the DICOM
checks made before any pixel is decoded.
"""

from .apikeys import ApiKey, ApiKeyStore, default_key_file, parse_scopes
from .audit import AUDIT_LOGGER, AuditMiddleware, note_study
from .install import authenticator_for, install_security
from .jwt_auth import JwtVerifier
from .middleware import Authenticator, AuthMiddleware, BodyLimitMiddleware
from .principal import Principal
from .scopes import SCOPES, required_scope

__all__ = [
    "AUDIT_LOGGER",
    "ApiKey",
    "ApiKeyStore",
    "AuditMiddleware",
    "AuthMiddleware",
    "Authenticator",
    "BodyLimitMiddleware",
    "JwtVerifier",
    "Principal",
    "SCOPES",
    "authenticator_for",
    "default_key_file",
    "install_security",
    "note_study",
    "parse_scopes",
    "required_scope",
]
