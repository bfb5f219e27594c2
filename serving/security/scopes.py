"""Which scope each path needs: the service's one access policy.

Paths are matched by prefix on whole segments (``/v1/jobs`` covers ``/v1/jobs/42``). Paths that no
rule names need ``admin``: a new route is closed until a rule opens it.
"""

from __future__ import annotations

__all__ = ["SCOPES", "OPEN_PATHS", "SCOPE_RULES", "required_scope", "grants"]

#: The scopes a credential can carry. ``admin`` grants every other scope.
SCOPES = ("predict", "monitor", "admin")

#: Paths anyone may call (probes, the API docs, the web page itself).
OPEN_PATHS = ("/", "/health", "/v2/health", "/docs", "/redoc", "/openapi.json", "/ui", "/favicon.ico")

#: Path prefix -> the scope it needs, checked in order; ``*`` matches any one segment.
SCOPE_RULES: tuple[tuple[str, str], ...] = (
    ("/v2/models/*/infer", "predict"),
    ("/v2/models/*/versions/*/infer", "predict"),
    ("/v1/predict", "predict"),
    ("/v1/triage", "predict"),
    ("/v1/jobs", "predict"),
    ("/v1/drift", "monitor"),
    ("/metrics", "monitor"),
    ("/v2/models", "monitor"),
)


def _under(path: str, prefix: str) -> bool:
    if prefix == "/":
        return path == "/"
    if "*" not in prefix:
        return path == prefix or path.startswith(prefix + "/")
    want, have = prefix.split("/"), path.split("/")
    return len(have) >= len(want) and all(w in ("*", h) for w, h in zip(want, have))


def required_scope(path: str) -> str | None:
    """The scope ``path`` needs, or None when it is open."""
    if any(_under(path, p) for p in OPEN_PATHS):
        return None
    for prefix, scope in SCOPE_RULES:
        if _under(path, prefix):
            return scope
    return "admin"


def grants(held: frozenset[str] | set[str], needed: str) -> bool:
    """Whether a credential holding ``held`` may use a route needing ``needed``."""
    return needed in held or "admin" in held
