"""Write a 3-D integer array as a single-frame MR or CT Image Storage series."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)

from imaging.dicom_read import GEOMETRY_ASSUMED_MARKER
from imaging.errors import ConfigError

__all__ = ["SUPPORTED_TRANSFER_SYNTAXES", "make_uid", "write_series"]

#: Transfer syntaxes :func:`write_series` can write (compressed ones through ``Dataset.compress``).
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}


def make_uid(uid_seed: str | None, *parts: object) -> UID:
    """A new UID: random, or derived from ``uid_seed`` and ``parts`` (reproducible)."""
    if uid_seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[uid_seed, *map(str, parts)])


def _stored(pixels: np.ndarray) -> np.ndarray:
    """Integer-valued ``pixels`` as uint16 (all >= 0) or int16, refusing anything else."""
    arr = np.asarray(pixels)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ConfigError(f"pixels must be a non-empty (slices, rows, cols) array, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
            raise ConfigError(f"pixels must be integer-valued, got dtype {arr.dtype}")
        if not np.array_equal(arr, np.round(arr)):
            raise ConfigError("pixels must be integer-valued (round or rescale them first)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16)
    if lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16)
    raise ConfigError(f"pixel values {lo:g}..{hi:g} do not fit in 16 bits")


def write_series(
    out_dir: Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "MR",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    manufacturer: str = "",
    model: str = "",
    institution: str = "",
    series_description: str = "",
    series_number: int = 1,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    geometry_assumed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_date: str = "",
    study_time: str = "",
    study_id: str = "",
    accession_number: str = "",
    frame_of_reference_uid: str | None = None,
    uid_seed: str | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """Write ``pixels`` as one DICOM file per slice.

    Slice ``i`` is at ImagePositionPatient z = ``i * spacing[0]`` with orientation
    ``[1, 0, 0, 0, 1, 0]``, so :func:`imaging.dicom_read.read_series` returns the slices in array
    order whatever the file order.

    Parameters
    ----------
    out_dir : Path
        Created if missing. Files are named ``{file_prefix}{i:04d}.dcm``.
    pixels : np.ndarray
        ``(slices, rows, cols)`` integer-valued *stored* values; the real-world value is
        ``stored * rescale_slope + rescale_intercept``. Stored as uint16 when all values are
        non-negative, int16 otherwise.
    patient_id, patient_name : str
        Patient module values (use fake or de-identified values only).
    study_uid, series_uid, frame_of_reference_uid : str, optional
        Generated when not given.
    modality : {"MR", "CT"}
        Selects MR Image Storage or CT Image Storage.
    spacing : (float, float, float)
        ``(slice, row, col)`` spacing in mm: SliceThickness/SpacingBetweenSlices and PixelSpacing.
    manufacturer, model, institution, series_description : str
        Equipment and series descriptions.
    series_number : int
        SeriesNumber.
    rescale_slope, rescale_intercept : float
        Written for CT always (RescaleType HU) and for MR when not the identity.
    geometry_assumed : bool
        Marks the spacing as assumed in ImageComments (read back as ``Volume.geometry_assumed``).
    transfer_syntax : str
        One of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    study_date, study_time, study_id, accession_number : str
        Study module values (Type 2: may be empty).
    uid_seed : str, optional
        Derive all generated UIDs from this text, so that the same call gives the same UIDs.
    file_prefix : str
        File name prefix.

    Returns
    -------
    list[Path]
        The files, first slice first.

    Raises
    ------
    ConfigError
        Bad pixels, modality, spacing or transfer syntax.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ConfigError(f"modality must be 'MR' or 'CT', got {modality!r}")
    ts = UID(str(transfer_syntax))
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(u.name for u in SUPPORTED_TRANSFER_SYNTAXES)
        raise ConfigError(f"transfer syntax {ts} ({ts.name}) is not supported; use one of: {names}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ConfigError(f"spacing must be three positive numbers (slice, row, col), got {spacing}")
    stored = _stored(pixels)
    n_slices, rows, cols = stored.shape
    signed = stored.dtype == np.int16

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or make_uid(uid_seed, "study")
    series_uid = series_uid or make_uid(uid_seed, "series")
    for_uid = frame_of_reference_uid or make_uid(uid_seed, "frame-of-reference")
    sop_class = _SOP_CLASS[modality]
    write_rescale = modality == "CT" or (rescale_slope, rescale_intercept) != (1.0, 0.0)
    # the in-plane origin centres the image on the patient axis (cosmetic, consistent per series)
    x0, y0 = -cols * sp[2] / 2.0, -rows * sp[1] / 2.0

    paths: list[Path] = []
    for i in range(n_slices):
        sop_uid = make_uid(uid_seed, "instance", i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        # patient and study
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = study_date
        ds.StudyTime = study_time
        ds.StudyID = study_id
        ds.AccessionNumber = accession_number
        ds.ReferringPhysicianName = ""
        # series, equipment, frame of reference
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = series_description
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = model
        ds.InstitutionName = institution
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # image
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientOrientation = ""
        ds.ContentDate = study_date
        ds.ContentTime = study_time
        ds.ImagePositionPatient = [x0, y0, i * sp[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = i * sp[0]
        ds.SliceThickness = sp[0]
        ds.SpacingBetweenSlices = sp[0]
        ds.PixelSpacing = [sp[1], sp[2]]
        if geometry_assumed:
            ds.ImageComments = f"{GEOMETRY_ASSUMED_MARKER}: spacing unknown in source"
        if modality == "MR":
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = None
            ds.RepetitionTime = None
            ds.EchoTrainLength = None
        else:
            ds.KVP = None
            ds.AcquisitionNumber = 1
        if write_rescale:
            ds.RescaleIntercept = rescale_intercept
            ds.RescaleSlope = rescale_slope
            ds.RescaleType = "HU" if modality == "CT" else "US"
        # pixels
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        frame = np.ascontiguousarray(stored[i])
        if ts == ExplicitVRLittleEndian:
            ds.PixelData = frame.tobytes()
        else:
            try:
                # keep our SOP Instance UID: compress() would otherwise generate a new one
                ds.compress(ts, frame, generate_instance_uid=False)
            except (RuntimeError, ValueError) as exc:  # e.g. openjpeg refuses images < 32 px
                raise ConfigError(f"cannot encode {rows}x{cols} pixels as {ts.name}: {exc}") from exc

        path = out_dir / f"{file_prefix}{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
