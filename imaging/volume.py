"""The in-memory form of one DICOM series, shared by every package."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Volume"]


@dataclass(frozen=True)
class Volume:
    """One series as a 3-D array plus the geometry and provenance fedseg needs.

    Attributes
    ----------
    pixels : np.ndarray
        ``(slices, rows, cols)`` float32, rescale slope and intercept applied,
        slices ordered along the slice normal (ImagePositionPatient).
    spacing : tuple[float, float, float]
        ``(slice, row, col)`` spacing in millimetres.
    series_uid, study_uid : str
        The series' identifiers. They stay on the site; never send them.
    sop_instance_uids : tuple[str, ...]
        One per slice, in ``pixels`` order, so that a SEG can be aligned.
    modality, manufacturer, model : str
        Acquisition facts used for reporting (vendor mix) and drift.
    patient_id : str
        Used only to split patients into train and test at the site.
    geometry_assumed : bool
        True when the writer marked the spacing as assumed, not measured.
    """

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    series_uid: str
    study_uid: str
    sop_instance_uids: tuple[str, ...]
    modality: str = ""
    manufacturer: str = ""
    model: str = ""
    patient_id: str = ""
    geometry_assumed: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        s, r, c = self.pixels.shape
        return int(s), int(r), int(c)
