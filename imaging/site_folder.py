"""Find the cases (series plus optional SEG) in a hospital's DICOM folder.

The folder may hold several series per patient, files with any names at any depth, and files
that are not DICOM. Every file that cannot be used is recorded as a :class:`FileProblem`, never
silently dropped; only hidden files/folders and the known side files in :data:`IGNORED_NAMES`
are skipped.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging.dicom_read import read_header, read_series
from imaging.dicom_seg import is_seg, read_seg_mask
from imaging.errors import (
    DataError,
    DicomReadError,
    ImagingError,
    NotDicomError,
    SegmentAlignmentError,
    SegmentationError,
    SeriesError,
    UnsupportedTransferSyntaxError,
)
from imaging.volume import Volume

__all__ = ["IGNORED_NAMES", "Case", "FileProblem", "SiteScan", "problem_kind", "scan_site", "load_case"]

#: Side files a site folder may hold next to its DICOM (not reported as problems).
IGNORED_NAMES = frozenset({"site.json", "policy.toml", "README.md", "README.txt", "DICOMDIR"})


@dataclass(frozen=True)
class Case:
    """One image series and, when present, the SEG that labels it.

    Attributes
    ----------
    series_uid : str
        The image series' SeriesInstanceUID.
    patient_id : str
        PatientID of the series (for patient-level train/test splits).
    files : tuple[Path, ...]
        The series' instance files, sorted by path (slice order is decided by ``read_series``).
    seg_file : Path or None
        The DICOM SEG referencing the series, if any.
    modality : str
        The series' Modality.
    series_description : str
        The series' SeriesDescription (for selection rules).
    """

    series_uid: str
    patient_id: str
    files: tuple[Path, ...]
    seg_file: Path | None = None
    modality: str = ""
    series_description: str = ""


@dataclass(frozen=True)
class FileProblem:
    """A file that the scan could not use, and why.

    ``reason`` is the full text (it may name the file and its UIDs: it stays at the site);
    ``kind`` is one of :data:`imaging.failure_codes.PROBLEM_KINDS`, safe to count anywhere.
    """

    path: Path
    reason: str
    kind: str = "unreadable"


def problem_kind(exc: ImagingError) -> str:
    """The :data:`~imaging.failure_codes.PROBLEM_KINDS` word for why a file or series failed."""
    for cls, kind in ((NotDicomError, "not-dicom"), (UnsupportedTransferSyntaxError, "unsupported-transfer-syntax"),
                      (SegmentAlignmentError, "seg-misaligned"), (SegmentationError, "seg-unusable"),
                      (SeriesError, "series-inconsistent")):
        if isinstance(exc, cls):
            return kind
    return "unreadable"


@dataclass(frozen=True)
class SiteScan:
    """The result of :func:`scan_site`: usable cases and the files that were not usable."""

    cases: list[Case] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)

    @property
    def labelled(self) -> list[Case]:
        """The cases that have a SEG."""
        return [c for c in self.cases if c.seg_file is not None]


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and f not in IGNORED_NAMES
        )
    return files


def scan_site(root: Path) -> SiteScan:
    """Scan ``root`` recursively (headers only) and pair each image series with its SEG.

    Parameters
    ----------
    root : Path
        The site's data folder.

    Returns
    -------
    SiteScan
        Cases sorted by patient and series UID; problems sorted by path. Problems include files
        that are not DICOM, DICOM objects that are not single-frame images or SEGs, a SEG whose
        series is absent, and extra SEGs for a series that already has one.

    Raises
    ------
    DataError
        ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"site folder {root} does not exist or is not a folder")

    problems: list[FileProblem] = []
    series_files: dict[str, list[Path]] = defaultdict(list)
    series_info: dict[str, tuple[str, str, str]] = {}
    segs: dict[str, list[Path]] = defaultdict(list)
    for path in _walk(root):
        try:
            ds = read_header(path)
        except DicomReadError as exc:
            problems.append(FileProblem(path, str(exc), problem_kind(exc)))
            continue
        if is_seg(ds):
            refs = [str(r.SeriesInstanceUID) for r in getattr(ds, "ReferencedSeriesSequence", [])]
            if len(refs) != 1:
                problems.append(FileProblem(path, f"SEG references {len(refs)} series, expected 1", "seg-ambiguous"))
            else:
                segs[refs[0]].append(path)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds:
            sop = getattr(ds, "SOPClassUID", None)
            what = sop.name if sop is not None else "unknown SOP class"
            problems.append(FileProblem(path, f"DICOM object is not an image ({what})", "not-an-image"))
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            problems.append(FileProblem(path, "multi-frame images are not supported", "multi-frame"))
            continue
        series_files[uid].append(path)
        series_info.setdefault(uid, (str(getattr(ds, "PatientID", "")), str(ds.get("Modality", "")),
                                     str(ds.get("SeriesDescription", "") or "")))

    cases: list[Case] = []
    for uid, files in series_files.items():
        seg_paths = sorted(segs.pop(uid, []))
        for extra in seg_paths[1:]:
            problems.append(FileProblem(extra, f"another SEG for series {uid}; using {seg_paths[0]}", "seg-extra"))
        patient_id, modality, description = series_info[uid]
        cases.append(Case(uid, patient_id, tuple(sorted(files)), seg_paths[0] if seg_paths else None,
                          modality, description))
    for uid, paths in segs.items():
        problems.extend(FileProblem(p, f"SEG references series {uid}, not in the folder", "seg-orphan")
                        for p in paths)
    cases.sort(key=lambda c: (c.patient_id, c.series_uid))
    problems.sort(key=lambda p: str(p.path))
    return SiteScan(cases, problems)


def load_case(case: Case) -> tuple[Volume, np.ndarray | None]:
    """Read a case's series and, if it has one, its SEG mask aligned to the volume.

    Returns
    -------
    tuple[Volume, np.ndarray or None]
        The volume and a uint8 ``(slices, rows, cols)`` mask, or None without a SEG.

    Raises
    ------
    DicomReadError, SeriesError, SegmentationError
        As :func:`imaging.dicom_read.read_series` and :func:`imaging.dicom_seg.read_seg_mask`.
    """
    volume = read_series(case.files)
    mask = read_seg_mask(case.seg_file, volume) if case.seg_file is not None else None
    return volume, mask
