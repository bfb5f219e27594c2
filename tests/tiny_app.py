"""A minimal Flower app folder (pyproject + a package) for FAB hashing and signing tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_PYPROJECT", "write_tiny_app"]

TINY_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyapp"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "acme"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""


def write_tiny_app(app: Path) -> Path:
    """``acme/tinyapp`` 1.0.0 in ``app``; returns ``app``."""
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "client.py").write_text("app = None\n")
    (app / "tinyapp" / "server.py").write_text("app = None\n")
    return app
