"""Which series of a site may be used: modality, series description pattern, minimum slices.

A site's config states the rules (``[selection]`` of ``site.toml``); the folder scan, the PACS
query and the preprocessed-slice cache all apply the same :class:`SeriesSelection`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["SeriesSelection"]


@dataclass(frozen=True)
class SeriesSelection:
    """Rules a series must meet to be used; the default keeps every series.

    Attributes
    ----------
    modality : tuple[str, ...]
        Allowed Modality values (upper case); empty allows any.
    series_description : str or None
        A regular expression searched (``re.search``) in SeriesDescription.
    min_slices : int
        The least number of instances (slices) a series must have.
    """

    modality: tuple[str, ...] = ()
    series_description: str | None = None
    min_slices: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", tuple(str(m).strip().upper() for m in self.modality))
        if any(not m for m in self.modality):
            raise ConfigError("selection modality values must not be empty")
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ConfigError(
                    f"selection series_description {self.series_description!r} is not a valid "
                    f"regular expression: {exc}"
                ) from None
        if isinstance(self.min_slices, bool) or int(self.min_slices) < 0:
            raise ConfigError(f"selection min_slices must be an integer >= 0, got {self.min_slices!r}")
        object.__setattr__(self, "min_slices", int(self.min_slices))

    @property
    def is_default(self) -> bool:
        """Whether every series is kept."""
        return self == SeriesSelection()

    def reason_to_exclude(self, modality: str, description: str, slices: int | None) -> str | None:
        """Why a series is left out, or None when it is selected.

        Parameters
        ----------
        modality, description : str
            The series' Modality and SeriesDescription.
        slices : int or None
            Its number of instances; None when unknown (the rule is then not applied).
        """
        if self.modality and modality.strip().upper() not in self.modality:
            return f"modality {modality or '(none)'} is not one of {', '.join(self.modality)}"
        if self.series_description is not None and not re.search(self.series_description, description):
            return f"series description does not match {self.series_description!r}"
        if slices is not None and slices < self.min_slices:
            return f"{slices} slice(s), fewer than min_slices {self.min_slices}"
        return None

    def to_dict(self) -> dict[str, object]:
        return {"modality": list(self.modality), "series_description": self.series_description,
                "min_slices": self.min_slices}

    def key(self) -> str:
        """A canonical text of the rules (part of cache keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)
