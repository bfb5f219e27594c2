"""A corpus of malformed DICOM, written with pydicom: each answered 4xx naming the rule, nothing grows."""

from __future__ import annotations

import gc
import io
import resource
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian, MPEG2MPML

from serving.errors import NotDicomError
from serving.uploads import UploadedFile, check_dicom
from tests.serving_fixtures import dataset_bytes, make_app, parts, write_tiny_series

MIB = 1024 * 1024
PIXEL_BUDGET_MB = 16
BOMB_INFLATED = 1024 * MIB  # the bomb inflates to 1 GiB; the guard stops it near 17 MiB


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("malformed-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSEG_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[TestClient]:
    app = make_app(auth="off", max_pixel_mb=PIXEL_BUDGET_MB, max_instances=4)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def good(home: Path) -> list[Path]:
    return write_tiny_series(home / "series", "good", (2, 24, 24))


def _ds(good: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(good[0])


def _deflate_bomb(good: list[Path]) -> bytes:
    """A Part 10 file whose Deflated Explicit VR data set inflates to 1 GiB of zeros."""
    ds = _ds(good)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    written = dataset_bytes(ds)  # pydicom writes the file meta and a (small) deflated data set
    fp = io.BytesIO(written)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    squeezer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(MIB)
    bomb = b"".join(squeezer.compress(zeros) for _ in range(BOMB_INFLATED // MIB)) + squeezer.flush()
    return written[: fp.tell()] + bomb


def _huge_image(good: list[Path]) -> bytes:
    ds = _ds(good)
    ds.Rows = ds.Columns = 65535  # 8 GiB declared at 16 bits, a few bytes present
    return dataset_bytes(ds)


def _huge_multiframe(good: list[Path]) -> bytes:
    ds = _ds(good)
    ds.NumberOfFrames = 100_000  # 24 x 24 x 100,000 frames x 16 bits: 110 MiB declared
    return dataset_bytes(ds)


def _no_file_meta(good: list[Path]) -> bytes:
    ds = _ds(good)
    del ds.file_meta
    ds.preamble = None
    return dataset_bytes(ds, file_format=False)


def _mpeg(good: list[Path]) -> bytes:
    ds = _ds(good)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    return dataset_bytes(ds)


def _unknown_syntax(good: list[Path]) -> bytes:
    ds = _ds(good)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # no such transfer syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _broken_deflate(good: list[Path]) -> bytes:
    bomb = _deflate_bomb_header(good)
    return bomb + b"\xff\xfe this is not a deflate stream" * 10


def _deflate_bomb_header(good: list[Path]) -> bytes:
    ds = _ds(good)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    written = dataset_bytes(ds)
    fp = io.BytesIO(written)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return written[: fp.tell()]


def _truncated_pixels(good: list[Path]) -> bytes:
    data = good[0].read_bytes()
    return data[: len(data) - 300]


def _truncated_header(good: list[Path]) -> bytes:
    return good[0].read_bytes()[:200]


# name -> (bytes factory, expected status, text that names the rule)
CORPUS: dict[str, tuple[Callable[[list[Path]], bytes], int, str]] = {
    "empty": (lambda good: b"", 415, "is empty"),
    "garbage": (lambda good: b"\x00" * 64 + b"hello", 415, "not a DICOM file"),
    "truncated-header": (_truncated_header, 415, "not a DICOM file"),
    "truncated-pixels": (_truncated_pixels, 422, "pixel data"),
    "no-file-meta": (_no_file_meta, 415, "no DICOM file meta"),
    "mpeg2": (_mpeg, 415, "transfer syntax allow-list"),
    "unknown-syntax": (_unknown_syntax, 415, "transfer syntax allow-list"),
    "deflate-bomb": (_deflate_bomb, 413, "deflate bomb guard"),
    "broken-deflate": (_broken_deflate, 400, "cannot be inflated"),
    "huge-image": (_huge_image, 413, "pixel budget"),
    "huge-multiframe": (_huge_multiframe, 413, "pixel budget"),
}


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.adversarial
def test_malformed_corpus_is_refused_without_growth(client: TestClient, good: list[Path]) -> None:
    corpus = {name: (make(good), code, text) for name, (make, code, text) in CORPUS.items()}
    assert len(corpus["deflate-bomb"][0]) < 8 * MIB  # small on the wire, 1 GiB inflated
    ok = client.post("/v1/predict", files=parts(good))  # warm up threads, model and allocator
    assert ok.status_code == 200, ok.text
    gc.collect()
    rss, peak = _rss(), _peak_rss()
    seconds: dict[str, float] = {}
    for _ in range(2):  # twice: a leak would show
        for name, (data, code, text) in corpus.items():
            start = time.perf_counter()
            r = client.post("/v1/predict", files=[("files", (f"{name}.dcm", data, "application/dicom"))])
            seconds[name] = time.perf_counter() - start
            assert r.status_code == code, (name, r.text)
            detail = r.json()["detail"]
            assert text in detail and f"{name}.dcm" in detail, (name, detail)
    gc.collect()
    grown, peak_grown = _rss() - rss, _peak_rss() - peak
    print({k: round(v, 3) for k, v in seconds.items()}, f"rss +{grown / MIB:.0f} MiB",
          f"peak +{peak_grown / MIB:.0f} MiB")
    assert grown < 128 * MIB
    assert peak_grown < 256 * MIB  # inflating the bomb would add more than 1 GiB


def test_client_file_names_are_never_taken_for_local_paths(good: list[Path], tmp_path: Path) -> None:
    # a client may name its upload after a file on the server; pydicom stats (and records) the
    # ``name`` of what it reads, so the upload's buffer must not carry the client's name
    local = tmp_path / "on-the-server.txt"
    local.write_text("not for clients")
    [checked] = check_dicom([UploadedFile(str(local), good[0].read_bytes())])
    assert checked.dataset is not None
    assert checked.dataset.filename is None and checked.dataset.timestamp is None
    with pytest.raises(NotDicomError, match="on-the-server.txt"):  # messages still name it
        check_dicom([UploadedFile(str(local), b"not dicom at all" * 20)])


def test_bomb_in_the_middle_of_a_good_series_names_its_file(client: TestClient, good: list[Path]) -> None:
    files = parts(good) + [("files", ("late.dcm", _deflate_bomb(good), "application/dicom"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 413 and "late.dcm" in r.json()["detail"]
    assert "FEDSEG_SERVE_MAX_PIXEL_MB" in r.json()["detail"]


def test_a_small_deflated_series_is_still_served(client: TestClient, good: list[Path], home: Path) -> None:
    files = []
    for path in good:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        files.append(("files", (path.name, dataset_bytes(ds), "application/dicom")))
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text


def test_pixel_budget_counts_the_whole_request(home: Path) -> None:
    series = write_tiny_series(home / "series", "budget", (4, 64, 64))  # 4 x 8 KiB
    app = make_app(auth="off", max_pixel_mb=1, max_instances=200)
    with TestClient(app) as c:
        assert c.post("/v1/predict", files=parts(series)).status_code == 200
        many = parts(series) * 40  # 160 instances x 8 KiB = 1.25 MiB > 1 MiB
        r = c.post("/v1/predict", files=many)
        assert r.status_code == 413 and "pixel budget" in r.json()["detail"]


def test_instance_cap(client: TestClient, home: Path) -> None:
    series = write_tiny_series(home / "series", "cap", (5, 8, 8))
    r = client.post("/v1/predict", files=parts(series))
    assert r.status_code == 413 and "FEDSEG_SERVE_MAX_INSTANCES" in r.json()["detail"]
