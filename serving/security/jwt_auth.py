"""OAuth2 bearer JWTs from a hospital's identity provider (PyJWT).

The verification keys come from a local file, never from the network: a PEM public key or a JWKS
document (``{"keys": [...]}``, chosen by the token's ``kid``). Only asymmetric algorithms are
accepted (RS256/ES256 by default), with ``exp``, ``iss`` and ``aud`` required. Scopes come from the
``scope`` claim (space-separated, OAuth2) or ``scp`` (a list or a space-separated string).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..errors import AuthConfigError, AuthenticationError
from .principal import Principal

__all__ = ["JwtVerifier", "ASYMMETRIC_ALGORITHMS", "token_scopes"]

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LEEWAY_S = 30


def token_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """The scopes of a token's claims (``scope`` or ``scp``)."""
    found: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


class JwtVerifier:
    """Verify bearer JWTs against local keys.

    Parameters
    ----------
    key_file : Path
        PEM public key, or a JWKS JSON document.
    issuer, audience : str
        Required ``iss`` and ``aud``.
    algorithms : sequence of str
        Accepted ``alg`` values (asymmetric only).

    Raises
    ------
    AuthConfigError
        The key file cannot be read, or an algorithm is not asymmetric.
    """

    def __init__(self, key_file: Path, *, issuer: str, audience: str,
                 algorithms: Sequence[str] = ("RS256", "ES256")) -> None:
        bad = sorted(set(algorithms) - ASYMMETRIC_ALGORITHMS)
        if bad or not algorithms:
            raise AuthConfigError(
                f"JWT algorithms {', '.join(bad) or '(none)'} are not accepted; use asymmetric "
                f"ones ({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
            )
        self.issuer, self.audience, self.algorithms = issuer, audience, list(algorithms)
        self._keys: dict[str | None, Any] = self._load(Path(key_file))

    @staticmethod
    def _load(path: Path) -> dict[str | None, Any]:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AuthConfigError(f"cannot read the JWT key file {path}: {exc}") from None
        try:
            if raw.lstrip().startswith(b"{"):
                jwks = jwt.PyJWKSet.from_dict(json.loads(raw))
                return {k.key_id: k.key for k in jwks.keys}
            return {None: load_pem_public_key(raw)}
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise AuthConfigError(
                f"the JWT key file {path} is neither a PEM public key nor a JWKS: {exc}"
            ) from None

    def _key(self, token: str) -> Any:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"malformed token: {exc}") from None
        if kid in self._keys:
            return self._keys[kid]
        if None in self._keys:  # a PEM key: no key ids to match
            return self._keys[None]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        raise AuthenticationError(f"the token's key id {kid!r} is not among the trusted keys")

    def verify(self, token: str) -> Principal:
        """The token's principal.

        Raises
        ------
        AuthenticationError
            Bad signature, expired, wrong issuer or audience, missing claims.
        """
        try:
            claims = jwt.decode(
                token, self._key(token), algorithms=self.algorithms, audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # a key/alg mismatch is a ValueError
            raise AuthenticationError(f"invalid token: {exc}") from None
        return Principal(name=str(claims["sub"]), method="jwt", scopes=token_scopes(claims))
