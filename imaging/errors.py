"""The imaging package's exception tree."""

from __future__ import annotations

__all__ = [
    "ImagingError",
    "DicomReadError",
    "NotDicomError",
    "UnsupportedTransferSyntaxError",
    "SeriesError",
    "SegmentationError",
    "SegmentAlignmentError",
    "ConfigError",
    "DataError",
    "NoUsableSeriesError",
    "ReplyError",
]


class ImagingError(Exception):
    """Base class of every error raised by :mod:`imaging`."""


class DicomReadError(ImagingError):
    """A file is not DICOM, or a DICOM object lacks what is needed (e.g. pixel data)."""


class NotDicomError(DicomReadError):
    """The file is not DICOM at all (no preamble, no DICOM elements)."""


class UnsupportedTransferSyntaxError(DicomReadError):
    """The pixel data uses a transfer syntax that no installed decoder handles."""


class SeriesError(ImagingError):
    """Instances do not form one consistent series (several series, mixed geometry...)."""


class SegmentationError(ImagingError):
    """A DICOM SEG cannot be read, written, or aligned with its source series."""


class SegmentAlignmentError(SegmentationError):
    """A SEG that does not fit its series: another series' UIDs, other frames, another size."""


class ConfigError(ImagingError, ValueError):
    """A configuration value is missing or out of range."""


class DataError(ImagingError):
    """A site's data cannot be used for training or evaluation."""


class NoUsableSeriesError(DataError):
    """A site has no labelled series it can use; the counts say what it has instead.

    ``problems`` counts the files and series left out by kind (``FileProblem.kind``); the
    message names the site's folder, the counts never do.
    """

    def __init__(self, message: str, *, labelled: int, unlabelled: int, excluded: int,
                 problems: dict[str, int]) -> None:
        super().__init__(message)
        self.labelled, self.unlabelled, self.excluded = labelled, unlabelled, excluded
        self.problems = dict(problems)


class ReplyError(ImagingError, ValueError):
    """A site's reply breaks its contract (:mod:`imaging.replies`): a key missing, unknown or out of range."""
