"""DICOM series reading/writing and SEG round trips (imaging.dicom_read/_write/_seg)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, MPEG2MPML, RLELossless, UID

from imaging.dicom_read import group_series, read_series
from imaging.dicom_seg import read_seg_mask, seg_referenced_series_uid, write_seg
from imaging.dicom_write import write_series
from imaging.errors import (
    ConfigError,
    DicomReadError,
    SegmentationError,
    SeriesError,
    UnsupportedTransferSyntaxError,
)


def _pixels(slices: int = 5, rows: int = 40, cols: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=(slices, rows, cols)).astype(np.uint16)


def _write(tmp_path: Path, name: str = "s", pixels: np.ndarray | None = None, **kw) -> list[Path]:
    kw.setdefault("patient_id", "P1")
    kw.setdefault("patient_name", "TEST^ONE")
    return write_series(tmp_path / name, _pixels() if pixels is None else pixels, **kw)


def test_slices_are_ordered_by_position_not_file_order(tmp_path: Path) -> None:
    px = _pixels()
    files = _write(tmp_path, pixels=px, spacing=(2.5, 0.8, 0.9))
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != files
    vol = read_series(shuffled)
    np.testing.assert_array_equal(vol.pixels, px)
    assert vol.pixels.dtype == np.float32
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.9))
    assert vol.sop_instance_uids == tuple(pydicom.dcmread(f).SOPInstanceUID for f in files)
    assert vol.patient_id == "P1" and vol.modality == "MR" and not vol.geometry_assumed


def test_instance_number_orders_slices_without_positions(tmp_path: Path) -> None:
    px = _pixels(slices=4)
    files = _write(tmp_path, pixels=px)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    vol = read_series(list(reversed(files)))
    np.testing.assert_array_equal(vol.pixels, px)


def test_ct_rescale_round_trip(tmp_path: Path) -> None:
    hu = np.random.default_rng(2).integers(-1024, 2000, size=(3, 32, 32))
    files = _write(tmp_path, pixels=hu + 1024, modality="CT", rescale_intercept=-1024.0)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, -1024, 0)
    vol = read_series(files)
    np.testing.assert_array_equal(vol.pixels, hu)
    assert vol.modality == "CT"


def test_signed_pixels_and_file_like_objects(tmp_path: Path) -> None:
    px = _pixels().astype(np.int32) - 1500
    files = _write(tmp_path, pixels=px, geometry_assumed=True)
    uploads = [io.BytesIO(f.read_bytes()) for f in files]
    vol = read_series(uploads)
    np.testing.assert_array_equal(vol.pixels, px)
    assert vol.geometry_assumed


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_round_trip(tmp_path: Path, syntax: UID) -> None:
    px = _pixels(slices=3)
    files = _write(tmp_path, pixels=px, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    vol = read_series(files)
    np.testing.assert_array_equal(vol.pixels, px)
    assert vol.extra["transfer_syntax"] == syntax


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="integer-valued"):
        _write(tmp_path, pixels=np.full((2, 8, 8), 0.5))
    with pytest.raises(ConfigError, match="modality"):
        _write(tmp_path, modality="US")
    with pytest.raises(ConfigError, match="not supported"):
        _write(tmp_path, transfer_syntax=MPEG2MPML)


def test_empty_list_refused() -> None:
    with pytest.raises(DicomReadError, match="no DICOM instances"):
        read_series([])


def test_several_series_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "a")
    b = _write(tmp_path, "b")
    with pytest.raises(SeriesError, match="found 2 series.*send one series"):
        read_series(a + b)
    groups = group_series(a + b)
    assert sorted(len(v) for v in groups.values()) == [5, 5]


def test_inconsistent_size_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "a")
    b = _write(tmp_path, "b", pixels=_pixels(rows=32))
    ds = pydicom.dcmread(b[0])
    ds.SeriesInstanceUID = pydicom.dcmread(a[0]).SeriesInstanceUID
    ds.save_as(b[0])
    with pytest.raises(SeriesError, match="different sizes"):
        read_series(a + [b[0]])


def test_not_dicom_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, not an image")
    with pytest.raises(DicomReadError, match=r"notes\.txt is not a DICOM file"):
        read_series(_write(tmp_path) + [bad])


def test_no_pixel_data_refused(tmp_path: Path) -> None:
    files = _write(tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    with pytest.raises(DicomReadError, match=f"{files[2].name} has no pixel data"):
        read_series(files)


def test_multiframe_refused(tmp_path: Path) -> None:
    files = _write(tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = 2
    ds.save_as(files[0])
    with pytest.raises(DicomReadError, match="multi-frame"):
        read_series(files)


def test_undecodable_transfer_syntax_refused(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError):  # no decoder exists for MPEG-2 in pydicom
        get_decoder(MPEG2MPML)
    files = _write(tmp_path, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(files[1])
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"1\.2\.840\.10008\.1\.2\.4\.100.*MPEG2"):
        read_series(files)


def test_seg_round_trip_aligned(tmp_path: Path) -> None:
    files = _write(tmp_path, pixels=_pixels(slices=6))
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    vol = read_series(files)
    mask = np.zeros(vol.shape, np.uint8)  # empty on most slices
    mask[1, 5:12, 6:20] = 1
    mask[4, 30:35, 2:4] = 1
    seg = write_seg(tmp_path / "seg.dcm", shuffled, mask, algorithm_name="test")
    assert seg_referenced_series_uid(seg) == vol.series_uid
    again = read_series(list(reversed(files)))
    out = read_seg_mask(seg, again)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)
    # from bytes too (an upload)
    np.testing.assert_array_equal(read_seg_mask(io.BytesIO(seg.read_bytes()), again), mask)


@pytest.mark.parametrize("fill", [0, 1])
def test_seg_empty_or_full(tmp_path: Path, fill: int) -> None:
    files = _write(tmp_path, pixels=_pixels(slices=3))
    vol = read_series(files)
    mask = np.full(vol.shape, fill, np.uint8)
    seg = write_seg(tmp_path / "seg.dcm", files, mask)
    np.testing.assert_array_equal(read_seg_mask(seg, vol), mask)


def test_seg_of_other_series_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "a")
    b = read_series(_write(tmp_path, "b"))
    seg = write_seg(tmp_path / "seg.dcm", a, np.zeros((5, 40, 48), np.uint8))
    with pytest.raises(SegmentationError, match="not the volume's series"):
        read_seg_mask(seg, b)
    with pytest.raises(SegmentationError, match="does not match"):
        write_seg(tmp_path / "bad.dcm", a, np.zeros((4, 40, 48), np.uint8))
    with pytest.raises(SegmentationError, match="not a DICOM SEG"):
        seg_referenced_series_uid(a[0])
