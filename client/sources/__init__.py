"""Where a site's DICOM comes from: a folder, or a PACS through DICOMweb."""

from __future__ import annotations

from .base import SiteSource, SyncReport
from .dicomweb import DicomWebSource, PacsCredentials
from .folder import FolderSource

__all__ = ["SiteSource", "SyncReport", "FolderSource", "DicomWebSource", "PacsCredentials"]
