"""Read single-frame DICOM instances of one series into a :class:`~imaging.volume.Volume`.

Everything that can go wrong with a file is raised as an :mod:`imaging.errors` exception whose
message names the file, so that a site operator (or an upload endpoint) can act on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from imaging.errors import DicomReadError, NotDicomError, SeriesError, UnsupportedTransferSyntaxError
from imaging.volume import Volume

__all__ = [
    "GEOMETRY_ASSUMED_MARKER",
    "DicomSource",
    "SeriesSource",
    "read_dataset",
    "read_header",
    "read_series",
    "group_series",
    "sort_slices",
    "check_decodable",
]

#: Text that :func:`imaging.dicom_write.write_series` puts in ImageComments when the spacing was
#: not measured; the reader looks for it case-insensitively.
GEOMETRY_ASSUMED_MARKER = "geometry assumed"

DicomSource = Path | str | BinaryIO
#: What :func:`read_series` takes per instance: a file, or a data set already parsed (with its
#: pixel data, not decoded), so that a caller that has parsed the file to check it (the upload
#: checks of ``serving.uploads``) does not parse it again.
SeriesSource = DicomSource | Dataset


def _name(source: DicomSource, index: int) -> str:
    """A human-readable name for a file or file-like object (for error messages)."""
    if isinstance(source, (str, Path)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, str) and name else f"<upload #{index + 1}>"


def _dcmread(source: DicomSource, name: str, *, stop_before_pixels: bool) -> Dataset:
    if not isinstance(source, (str, Path)) and hasattr(source, "seek"):
        source.seek(0)  # an upload may have been read before
    try:
        return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise NotDicomError(f"{name} is not a DICOM file") from None
    except FileNotFoundError:
        raise DicomReadError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise DicomReadError(f"{name} is a directory, not a DICOM file") from None
    except Exception as exc:  # truncated or corrupt files raise many different types
        raise DicomReadError(f"{name} cannot be read as DICOM: {exc}") from exc


def read_header(source: DicomSource, *, name: str | None = None) -> Dataset:
    """Read one file's header, stopping before the pixel data.

    Parameters
    ----------
    source : Path, str or binary file-like object
        The DICOM file.
    name : str, optional
        The name to use in error messages (default: the path or the object's ``name``).

    Returns
    -------
    pydicom.dataset.Dataset
        The header, without ``PixelData``.

    Raises
    ------
    DicomReadError
        The file does not exist or is not DICOM.
    """
    return _dcmread(source, name or _name(source, 0), stop_before_pixels=True)


def read_dataset(source: DicomSource, *, name: str | None = None) -> Dataset:
    """Parse one whole file, pixel data included but not decoded (one parse for header and pixels).

    Raises
    ------
    DicomReadError
        The file does not exist or is not DICOM.
    """
    return _dcmread(source, name or _name(source, 0), stop_before_pixels=False)


def check_decodable(ds: Dataset, name: str) -> None:
    """Raise :class:`UnsupportedTransferSyntaxError` if no installed decoder handles ``ds``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with file meta information.
    name : str
        The file's name, for the message.
    """
    meta = getattr(ds, "file_meta", None)
    uid = UID(str(getattr(meta, "TransferSyntaxUID", "") or "")) if meta is not None else UID("")
    if not uid or not uid.is_compressed:
        return  # native (or unknown: pydicom guesses), no decoder plug-in needed
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"{name}: transfer syntax {uid} ({uid.name}) cannot be decoded by the installed "
            "pixel data handlers; send the series uncompressed or with a lossless syntax "
            "(RLE, JPEG-LS, JPEG 2000)"
        )


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def _positions(datasets: Sequence[Dataset]) -> np.ndarray | None:
    """Each instance's position along the slice normal, or None if geometry is missing."""
    normal = _normal(datasets[0])
    if normal is None:
        return None
    out = []
    for ds in datasets:
        ipp = getattr(ds, "ImagePositionPatient", None)
        if ipp is None or len(ipp) != 3:
            return None
        out.append(float(np.dot(np.asarray(ipp, float), normal)))
    return np.asarray(out)


def sort_slices(datasets: Sequence[Dataset]) -> list[int]:
    """The order in which to stack ``datasets`` as slices.

    Instances are sorted by ImagePositionPatient projected on the slice normal (the cross product
    of the ImageOrientationPatient row and column directions); when any instance lacks position or
    orientation, by InstanceNumber; otherwise the given order is kept. The sort is stable.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        Headers of one series.

    Returns
    -------
    list[int]
        Indices into ``datasets``, first slice first.
    """
    if not datasets:
        return []
    pos = _positions(datasets)
    if pos is not None:
        return [int(i) for i in np.argsort(pos, kind="stable")]
    numbers = [getattr(ds, "InstanceNumber", None) for ds in datasets]
    if all(n is not None for n in numbers):
        return sorted(range(len(datasets)), key=lambda i: int(numbers[i]))
    return list(range(len(datasets)))


def _spacing(datasets: Sequence[Dataset]) -> tuple[tuple[float, float, float], bool]:
    """``(slice, row, col)`` spacing of sorted instances, and whether any value was guessed."""
    first = datasets[0]
    guessed = False
    ps = getattr(first, "PixelSpacing", None)
    if ps is not None and len(ps) == 2 and float(ps[0]) > 0 and float(ps[1]) > 0:
        row_sp, col_sp = float(ps[0]), float(ps[1])
    else:
        row_sp = col_sp = 1.0
        guessed = True
    pos = _positions(datasets)
    slice_sp = 0.0
    if pos is not None and len(pos) > 1:
        slice_sp = float(np.median(np.abs(np.diff(pos))))
    if slice_sp <= 0:
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            value = getattr(first, key, None)
            if value not in (None, "") and float(value) > 0:
                slice_sp = float(value)
                break
    if slice_sp <= 0:
        slice_sp = 1.0
        guessed = True
    return (slice_sp, row_sp, col_sp), guessed


def _str(ds: Dataset, key: str) -> str:
    value = getattr(ds, key, "")
    return "" if value is None else str(value)


def read_series(paths: Sequence[SeriesSource], *, names: Sequence[str] | None = None) -> Volume:
    """Read the single-frame instances of one series into a :class:`Volume`.

    Parameters
    ----------
    paths : sequence of Path, str, binary file-like objects or pydicom Datasets
        All instances of one series, in any order (e.g. the files of an upload). A Dataset is
        used as it is (it must hold its pixel data): each file is parsed once.
    names : sequence of str, optional
        The instances' names for error messages (default: the path, the object's ``name``, or
        ``<upload #N>``).

    Returns
    -------
    Volume
        Pixels ``(slices, rows, cols)`` float32 with RescaleSlope/Intercept applied, slices
        ordered along the slice normal. ``geometry_assumed`` is True when the writer marked the
        geometry as assumed (ImageComments) or when this reader had to guess a spacing.

    Raises
    ------
    DicomReadError
        No instances, a file that is not DICOM, without pixel data, or multi-frame.
    UnsupportedTransferSyntaxError
        Pixel data that the installed decoders cannot decode.
    SeriesError
        Instances from several series, or with different rows/columns or orientation.
    """
    if len(paths) == 0:
        raise DicomReadError("no DICOM instances given: send the files of one series")
    if names is None:
        names = [_name(p, i) for i, p in enumerate(paths)]
    elif len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} instances")
    names = list(names)
    datasets = [
        p if isinstance(p, Dataset) else _dcmread(p, n, stop_before_pixels=False)
        for p, n in zip(paths, names)
    ]

    for ds, name in zip(datasets, names):
        if "PixelData" not in ds:
            raise DicomReadError(f"{name} has no pixel data (SOP class {_str(ds, 'SOPClassUID')})")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise DicomReadError(
                f"{name} is a multi-frame instance ({ds.NumberOfFrames} frames); "
                "only single-frame series are supported"
            )

    series = sorted({_str(ds, "SeriesInstanceUID") for ds in datasets})
    if len(series) > 1:
        raise SeriesError(
            f"found {len(series)} series among {len(datasets)} files "
            f"({', '.join(series[:3])}{', ...' if len(series) > 3 else ''}); send one series"
        )
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise SeriesError(f"instances of series {series[0]} have different sizes: {sorted(shapes)}")
    orientations = {
        tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 4))
        for ds in datasets
        if "ImageOrientationPatient" in ds
    }
    if len(orientations) > 1:
        raise SeriesError(f"instances of series {series[0]} have different orientations")

    order = sort_slices(datasets)
    datasets = [datasets[i] for i in order]
    names = [names[i] for i in order]

    rows, cols = shapes.pop()
    pixels = np.empty((len(datasets), rows, cols), dtype=np.float32)  # filled slice by slice
    for index, (ds, name) in enumerate(zip(datasets, names)):
        check_decodable(ds, name)
        try:
            stored = pixel_array(ds)  # decoded once, not cached on the data set
        except Exception as exc:  # a decoder that is present can still fail on the data
            uid = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in ds.file_meta else "?"
            cls = UnsupportedTransferSyntaxError if UID(str(uid)).is_compressed else DicomReadError
            raise cls(
                f"{name}: pixel data cannot be decoded (transfer syntax {uid} "
                f"{UID(str(uid)).name}): {exc}"
            ) from exc
        if stored.ndim != 2:
            raise DicomReadError(f"{name}: expected one grey-scale frame, got shape {stored.shape}")
        if stored.shape != (rows, cols):  # Rows/Columns that do not describe the pixel data
            raise DicomReadError(f"{name}: pixel data of shape {stored.shape}, but Rows x Columns "
                                 f"is {rows} x {cols}")
        pixels[index] = apply_modality_lut(stored, ds)  # cast to float32 on assignment

    spacing, guessed = _spacing(datasets)
    first = datasets[0]
    marked = any(GEOMETRY_ASSUMED_MARKER in _str(ds, "ImageComments").lower() for ds in datasets)
    extra = {
        "transfer_syntax": str(first.file_meta.get("TransferSyntaxUID", "")),
        "series_description": _str(first, "SeriesDescription"),
        "institution": _str(first, "InstitutionName"),
    }
    if "FrameOfReferenceUID" in first:
        extra["frame_of_reference_uid"] = _str(first, "FrameOfReferenceUID")
    return Volume(
        pixels=pixels,
        spacing=spacing,
        series_uid=series[0],
        study_uid=_str(first, "StudyInstanceUID"),
        sop_instance_uids=tuple(_str(ds, "SOPInstanceUID") for ds in datasets),
        modality=_str(first, "Modality"),
        manufacturer=_str(first, "Manufacturer"),
        model=_str(first, "ManufacturerModelName"),
        patient_id=_str(first, "PatientID"),
        geometry_assumed=marked or guessed,
        extra=extra,
    )


def group_series(paths: Sequence[Path | str]) -> dict[str, list[Path]]:
    """Group files by SeriesInstanceUID, reading headers only.

    Parameters
    ----------
    paths : sequence of Path or str
        DICOM files. Every object with a SeriesInstanceUID is grouped, including SEGs (a SEG is
        its own series).

    Returns
    -------
    dict[str, list[Path]]
        Series UID to its files, in the given order.

    Raises
    ------
    DicomReadError
        A file is not DICOM or has no SeriesInstanceUID. Use :func:`imaging.site_folder.scan_site`
        to record such files instead of failing.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        ds = read_header(p)
        uid = _str(ds, "SeriesInstanceUID")
        if not uid:
            raise DicomReadError(f"{p} has no SeriesInstanceUID")
        groups[uid].append(Path(p))
    return dict(groups)

