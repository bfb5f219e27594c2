"""The imaging package's exception tree."""

from __future__ import annotations

__all__ = [
    "ImagingError",
    "DicomReadError",
    "UnsupportedTransferSyntaxError",
    "SeriesError",
    "SegmentationError",
    "ConfigError",
    "DataError",
    "ReplyError",
]


class ImagingError(Exception):
    """Base class of every error raised by :mod:`imaging`."""


class DicomReadError(ImagingError):
    """A file is not DICOM, or a DICOM object lacks what is needed (e.g. pixel data)."""


class UnsupportedTransferSyntaxError(DicomReadError):
    """The pixel data uses a transfer syntax that no installed decoder handles."""


class SeriesError(ImagingError):
    """Instances do not form one consistent series (several series, mixed geometry...)."""


class SegmentationError(ImagingError):
    """A DICOM SEG cannot be read, written, or aligned with its source series."""


class ConfigError(ImagingError, ValueError):
    """A configuration value is missing or out of range."""


class DataError(ImagingError):
    """A site's data cannot be used for training or evaluation."""


class ReplyError(ImagingError, ValueError):
    """A site's reply breaks its contract (:mod:`imaging.replies`): a key missing, unknown or out of range."""
