"""The embedded default state directory, ``$FEDSEG_HOME`` (default ``~/.fedseg``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fedseg_home"]


def fedseg_home() -> Path:
    """The directory holding MLflow's sqlite store and artifacts and whatever fedseg writes."""
    raw = os.environ.get("FEDSEG_HOME", "").strip()
    home = Path(raw).expanduser() if raw else Path.home() / ".fedseg"
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home
