"""The interface every site data source implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imaging.selection import SeriesSelection

__all__ = ["SiteSource", "SyncReport"]


@dataclass(frozen=True)
class SyncReport:
    """What :meth:`SiteSource.sync` found and did; nothing here identifies a patient or series.

    Attributes
    ----------
    folder : Path
        The local folder that now holds the source's DICOM (the folder itself, or the fetch cache).
    series_listed : int or None
        Image series the source offers before selection (None: a folder, counted by its scan).
    series_selected : int or None
        Of those, the series that the selection rules keep.
    series_fetched, instances_fetched : int
        Series (image or SEG) retrieved this time, and their instances.
    series_unchanged : int
        Series already in the cache with the same instances: not retrieved again.
    series_removed : int
        Series dropped from the cache (no longer offered or selected).
    excluded : tuple[str, ...]
        Why each left-out series was excluded (no identifiers).
    offline : bool
        The source could not be reached and the cache was used as it was.
    """

    folder: Path
    series_listed: int | None = None
    series_selected: int | None = None
    series_fetched: int = 0
    instances_fetched: int = 0
    series_unchanged: int = 0
    series_removed: int = 0
    excluded: tuple[str, ...] = ()
    offline: bool = False


class SiteSource(Protocol):
    """A site's data: brought to a local folder by :meth:`sync`, filtered by ``selection``."""

    kind: str
    selection: SeriesSelection

    def describe(self) -> str:
        """Where the data comes from, for logs and reports (never a credential)."""
        ...

    def sync(self) -> SyncReport:
        """Make the local folder current (a PACS fetches what changed) and report what it did."""
        ...
