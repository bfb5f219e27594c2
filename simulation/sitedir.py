"""The on-disk layout shared by the site generators.

``<out>/<site>/patients/<patient>/series/*.dcm``, ``<out>/<site>/patients/<patient>/seg.dcm`` and
``<out>/<site>/site.json`` (generator parameters and a summary; no PHI).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from imaging.errors import DataError

__all__ = [
    "SITE_JSON",
    "site_letters",
    "check_site_dirs",
    "prepare_site_dir",
    "patient_dirs",
    "write_site_json",
    "read_site_json",
]

SITE_JSON = "site.json"


def site_letters(index: int) -> str:
    """``0 -> "a"``, ``25 -> "z"``, ``26 -> "aa"`` (bijective base 26)."""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index}")
    out = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def check_site_dirs(paths: list[Path], *, overwrite: bool) -> None:
    """Raise :class:`DataError` before writing anything if a site folder cannot be (re)written.

    A non-empty folder may be replaced only with ``overwrite`` and only when it holds a
    ``site.json`` (i.e. a generator wrote it).
    """
    for path in map(Path, paths):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not overwrite:
                raise DataError(f"{path} exists and is not empty (overwrite it with --force)")
            if not (path / SITE_JSON).is_file():
                raise DataError(f"refusing to delete {path}: it was not written by a site generator")


def prepare_site_dir(path: Path, *, overwrite: bool) -> Path:
    """Make ``path`` an empty folder (see :func:`check_site_dirs` for what may be replaced)."""
    path = Path(path)
    check_site_dirs([path], overwrite=overwrite)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def patient_dirs(site: Path, patient: str) -> tuple[Path, Path]:
    """The series folder and SEG path of ``patient`` in ``site``."""
    base = Path(site) / "patients" / patient
    return base / "series", base / "seg.dcm"


def write_site_json(site: Path, info: dict[str, Any]) -> Path:
    """Write ``info`` as ``site.json``."""
    path = Path(site) / SITE_JSON
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_site_json(site: Path) -> dict[str, Any]:
    """Read a site's ``site.json`` (empty dict if missing)."""
    path = Path(site) / SITE_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
