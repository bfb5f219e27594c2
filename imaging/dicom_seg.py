"""Binary DICOM SEG objects for one-label masks, through highdicom."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from imaging.dicom_read import read_header, sort_slices
from imaging.dicom_write import make_uid
from imaging.errors import DicomReadError, SegmentAlignmentError, SegmentationError
from imaging.volume import Volume

__all__ = ["write_seg", "read_seg_mask", "seg_referenced_series_uid", "is_seg"]


def is_seg(ds: Dataset) -> bool:
    """Whether a header belongs to a DICOM Segmentation Storage object."""
    return str(getattr(ds, "SOPClassUID", "")) == SegmentationStorage


def _source_headers(sources: Sequence[Path | str | Dataset]) -> list[Dataset]:
    headers = [s if isinstance(s, Dataset) else read_header(s) for s in sources]
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in headers}
    if len(series) != 1:
        raise SegmentationError(f"source instances belong to {len(series)} series; give one series")
    return [headers[i] for i in sort_slices(headers)]


def write_seg(
    out_path: Path,
    source_paths: Sequence[Path | str | Dataset],
    mask: np.ndarray,
    *,
    label: str = "lesion",
    manufacturer: str = "fedseg",
    model: str = "fedseg",
    software_version: str = "0.1.0",
    algorithm_name: str | None = None,
    algorithm_version: str = "0.1.0",
    series_description: str = "fedseg segmentation",
    series_number: int = 100,
    uid_seed: str | None = None,
) -> Path:
    """Write a binary, one-segment DICOM SEG referencing ``source_paths``.

    Parameters
    ----------
    out_path : Path
        The SEG file to write (parent folders are created).
    source_paths : sequence of Path, str or pydicom Dataset
        The instances of the segmented series, in any order (headers are enough).
    mask : np.ndarray
        ``(slices, rows, cols)``, non-zero inside the segment, slices in the order of
        ``read_series(source_paths).pixels``. May be empty on any or all slices.
    label : str
        The segment label.
    manufacturer, model, software_version : str
        Equipment of the SEG.
    algorithm_name, algorithm_version : str
        With a name, the segment is AUTOMATIC (AI algorithm); without, MANUAL.
    series_description, series_number : str, int
        Series values of the SEG.
    uid_seed : str, optional
        Derive the SEG's UIDs from this text (reproducible output).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    SegmentationError
        The mask's shape does not match the series, or highdicom refuses the inputs.
    """
    sources = _source_headers(source_paths)
    arr = np.asarray(mask)
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if arr.shape != expected:
        raise SegmentationError(f"mask shape {arr.shape} does not match the series {expected}")
    binary = (arr != 0).astype(np.uint8)

    if algorithm_name:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name=algorithm_name,
            version=algorithm_version,
            family=codes.DCM.ArtificialIntelligence,
        )
    else:
        algorithm_type, algorithm = hd.seg.SegmentAlgorithmTypeValues.MANUAL, None
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=binary,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=make_uid(uid_seed, "seg-series"),
            series_number=series_number,
            sop_instance_uid=make_uid(uid_seed, "seg-instance"),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=model,
            software_versions=software_version,
            device_serial_number="0",
            series_description=series_description,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            # omit empty frames, unless all are empty (highdicom would then log and keep them all)
            omit_empty_frames=bool(binary.any()),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SegmentationError(f"cannot build a DICOM SEG: {exc}") from exc
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path


def _load_seg(seg: Path | str | BinaryIO | Dataset) -> hd.seg.Segmentation:
    try:
        if isinstance(seg, hd.seg.Segmentation):
            return seg
        if isinstance(seg, Dataset):
            return hd.seg.Segmentation.from_dataset(seg, copy=False)
        if not isinstance(seg, (str, Path)) and hasattr(seg, "seek"):
            seg.seek(0)
        return hd.seg.segread(seg)
    except (pydicom.errors.InvalidDicomError, FileNotFoundError) as exc:
        raise SegmentationError(f"{getattr(seg, 'name', seg)} is not a readable DICOM file") from exc
    except (ValueError, AttributeError, KeyError) as exc:
        raise SegmentationError(f"{getattr(seg, 'name', seg)} is not a DICOM SEG: {exc}") from exc


def _referenced_series(ds: Dataset) -> list[str]:
    return [str(item.SeriesInstanceUID) for item in getattr(ds, "ReferencedSeriesSequence", [])]


def read_seg_mask(seg: Path | str | BinaryIO | Dataset, volume: Volume) -> np.ndarray:
    """Read a SEG as a binary mask aligned slice by slice with ``volume``.

    Parameters
    ----------
    seg : Path, str, binary file-like object or pydicom Dataset
        A DICOM SEG that references ``volume``'s series. All its segments are merged.
    volume : Volume
        The source series, as returned by :func:`imaging.dicom_read.read_series`.

    Returns
    -------
    np.ndarray
        uint8 ``(slices, rows, cols)`` in {0, 1}, in ``volume.sop_instance_uids`` order; slices
        that the SEG omits (empty frames) are zero.

    Raises
    ------
    SegmentationError
        Not a SEG, a SEG of another series, or frames of another size.
    """
    obj = _load_seg(seg)
    referenced = _referenced_series(obj)
    if volume.series_uid not in referenced:
        raise SegmentAlignmentError(
            f"the SEG references series {', '.join(referenced) or '(none)'}, "
            f"not the volume's series {volume.series_uid}"
        )
    if (int(obj.Rows), int(obj.Columns)) != volume.shape[1:]:
        raise SegmentAlignmentError(
            f"SEG frames are {obj.Rows}x{obj.Columns}, the series' slices {volume.shape[1:]}"
        )
    try:
        pixels = obj.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            assert_missing_frames_are_empty=True,  # omitted (empty) frames read as zeros
            dtype=np.uint8,
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SegmentAlignmentError(f"cannot align the SEG with series {volume.series_uid}: {exc}") from exc
    mask = (pixels.reshape(pixels.shape[:3] + (-1,)) > 0).any(axis=-1).astype(np.uint8)
    if mask.shape != volume.shape:
        raise SegmentAlignmentError(f"SEG mask shape {mask.shape} differs from the volume's {volume.shape}")
    return mask


def seg_referenced_series_uid(path: Path | str | BinaryIO) -> str:
    """The SeriesInstanceUID a SEG segments, reading the header only.

    Raises
    ------
    SegmentationError
        Not a SEG, or a SEG that references no series or several.
    """
    try:
        ds = read_header(path)
    except DicomReadError as exc:
        raise SegmentationError(str(exc)) from exc
    if not is_seg(ds):
        raise SegmentationError(f"{getattr(path, 'name', path)} is not a DICOM SEG")
    referenced = _referenced_series(ds)
    if len(referenced) != 1:
        raise SegmentationError(
            f"{getattr(path, 'name', path)} references {len(referenced)} series; expected one"
        )
    return referenced[0]
