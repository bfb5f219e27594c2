"""The model's mask as a DICOM SEG referencing the uploaded instances (via imaging.dicom_seg)."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom

from imaging.dicom_seg import write_seg

from ..inference import Analysis

__all__ = ["SegObject", "build_seg", "DICOM_MEDIA_TYPE"]

DICOM_MEDIA_TYPE = "application/dicom"


@dataclass(frozen=True)
class SegObject:
    """A serialised DICOM SEG and the identifiers a client or PACS needs."""

    data: bytes
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def build_seg(analysis: Analysis, *, uid_seed: str | None = None) -> SegObject:
    """A binary one-segment SEG of ``analysis``' mask, in the source series' study.

    The segment is AUTOMATIC, its algorithm the served model (name and version); the SEG
    references every source instance (ReferencedSeriesSequence, per-frame source images).

    Parameters
    ----------
    analysis : Analysis
        The series' headers and the prediction.
    uid_seed : str, optional
        Derive the SEG's UIDs from this text (a job re-run then writes the same SEG).

    Raises
    ------
    imaging.errors.SegmentationError
        highdicom refuses the sources (for example, missing geometry attributes).
    """
    with tempfile.TemporaryDirectory(prefix="fedseg-seg-") as tmp:
        path = write_seg(
            Path(tmp) / "seg.dcm",
            analysis.headers,
            analysis.prediction.mask,
            algorithm_name=analysis.model_name,
            algorithm_version=str(analysis.model_version),
            series_description=f"fedseg {analysis.model_name} v{analysis.model_version}",
            uid_seed=uid_seed,
        )
        data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return SegObject(
        data=data,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
    )
