"""A DICOM folder on the node's disk: recursive, any names, several series per patient."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imaging.selection import SeriesSelection

from ..errors import SourceError
from .base import SyncReport

__all__ = ["FolderSource"]


@dataclass(frozen=True)
class FolderSource:
    """The site's DICOM files under ``path`` (read in place, nothing is copied)."""

    path: Path
    selection: SeriesSelection = field(default_factory=SeriesSelection)
    kind: str = field(default="folder", init=False)

    def describe(self) -> str:
        return f"DICOM folder {self.path}"

    def sync(self) -> SyncReport:
        """Nothing to fetch; checks that the folder exists.

        Raises
        ------
        SourceError
            ``path`` is not a folder.
        """
        if not Path(self.path).is_dir():
            raise SourceError(f"the site's DICOM folder {self.path} does not exist or is not a folder")
        return SyncReport(folder=Path(self.path))
