"""Lineage tags of a published model: where it came from, in strings."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["code_version"]


def code_version() -> str:
    """``<package version>+g<git sha>`` when run from a git checkout, else the package version."""
    try:
        base = version("fedseg")
    except PackageNotFoundError:
        base = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return base
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return f"{base}+g{sha}{'.dirty' if dirty else ''}"


def compact_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
