"""``uvicorn serving.main:app``: the service configured from ``FEDSEG_SERVE_*`` variables."""

from __future__ import annotations

from .app import create_app
from .settings import ServingSettings

__all__ = ["app"]

app = create_app(ServingSettings())
