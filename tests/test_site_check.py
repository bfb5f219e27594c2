"""`fedseg site check` on a folder with broken files and on a real Orthanc; the manifest holds no PHI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner, Result
from orthanc import OrthancServer
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from client.cli import site as site_cli

# every value of these keywords in the data must stay out of the manifest
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate",
               "SeriesDate", "AcquisitionDate", "ContentDate", "InstitutionName", "AccessionNumber",
               "StudyID")


def _check(config: Path, *args: str) -> Result:
    return CliRunner().invoke(site_cli, ["check", "--config", str(config), *args],
                              catch_exceptions=False)


def _config(path: Path, source: str, selection: str = "") -> Path:
    path.write_text(f'[site]\nname = "hospital-q"\n[source]\n{source}\n'
                    + (f"[selection]\n{selection}\n" if selection else ""))
    return path


def _identifying_values(files: list[Path]) -> set[str]:
    values: set[str] = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for elem in ds.iterall():
            if elem.keyword in IDENTIFYING and elem.value not in (None, ""):
                values.add(str(elem.value))
    return values


@pytest.fixture
def broken_site(tmp_path: Path, synthetic_sites: list[Path]) -> dict[str, Path]:
    """site-a (4 MR patients) with one problem of each kind; patient A004 stays fine."""
    root = tmp_path / "dicom"
    shutil.copytree(synthetic_sites[0], root)
    patients = root / "patients"
    named = {"notes": root / "notes.txt", "truncated": patients / "SYN-A004" / "series" / "IM9999.dcm"}
    named["notes"].write_text("scanner export notes, not DICOM\n")
    good = sorted((patients / "SYN-A004" / "series").glob("*.dcm"))
    named["truncated"].write_bytes(good[0].read_bytes()[:600])  # header cut before the image attrs
    # A001: a slice whose pixel data is cut short -> the series cannot be read
    a1 = sorted((patients / "SYN-A001" / "series").glob("*.dcm"))
    named["corrupt"] = a1[3]
    named["corrupt"].write_bytes(a1[3].read_bytes()[:-500])
    # A002: no SEG
    named["no_seg"] = patients / "SYN-A002" / "series"
    (patients / "SYN-A002" / "seg.dcm").unlink()
    # A003: one slice in a transfer syntax nothing here decodes, one tilted slice
    a3 = sorted((patients / "SYN-A003" / "series").glob("*.dcm"))
    ds = pydicom.dcmread(a3[0])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(a3[0], enforce_file_format=True)
    named["mpeg"] = a3[0]
    ds = pydicom.dcmread(a3[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(a3[5])
    named["tilted"] = a3[5]
    named["root"] = root
    return named


def test_site_check_lists_every_problem_and_still_passes(
    tmp_path: Path, broken_site: dict[str, Path]
) -> None:
    config = _config(tmp_path / "site.toml", 'kind = "folder"\npath = "dicom"', 'modality = ["MR"]')
    manifest_path = tmp_path / "out" / "manifest.json"
    result = _check(config, "--format", "json", "--manifest-out", str(manifest_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["series"] == 4 and report["series_selected"] == 4
    assert report["series_usable"] == 1 and report["usable"] is True
    assert report["studies"] == 4 and report["patients"] == 4
    assert report["masks"] == {"found": 3, "missing": 1, "unusable": 0}  # only A002 lacks one
    assert report["vendors"] == {"Acme Medical": 4}
    assert report["orientations"] == {"axial": 4}
    assert report["problem_counts"] == {
        "not-dicom": 1, "unreadable": 2, "unsupported-transfer-syntax": 1,
        "inconsistent-geometry": 1, "missing-seg": 1,
    }
    by_file = {p["file"]: p["problem"] for p in report["problems"]}
    assert by_file == {
        str(broken_site["notes"]): "not-dicom",
        str(broken_site["truncated"]): "unreadable",
        str(broken_site["corrupt"]): "unreadable",
        str(broken_site["mpeg"]): "unsupported-transfer-syntax",
        str(broken_site["tilted"]): "inconsistent-geometry",
        str(broken_site["no_seg"]): "missing-seg",
    }
    assert report["manifest"] == str(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"]["series_usable"] == 1 and len(manifest["series"]) == 4
    assert manifest["problem_counts"] == report["problem_counts"]

    table = _check(config, "--manifest-out", str(manifest_path))
    assert table.exit_code == 0
    assert "4 found, 4 selected, 0 excluded, 1 usable" in table.output
    assert f"missing-seg                  {broken_site['no_seg']}" in table.output
    assert "RESULT: 1 usable series" in table.output


def test_site_check_fails_when_nothing_is_usable(tmp_path: Path, broken_site: dict[str, Path]) -> None:
    shutil.rmtree(broken_site["root"] / "patients" / "SYN-A004")  # the only good patient
    config = _config(tmp_path / "site.toml", 'kind = "folder"\npath = "dicom"')
    result = _check(config, "--manifest-out", str(tmp_path / "m.json"))
    assert result.exit_code == 1
    assert "NOTHING USABLE" in result.output
    ct = _config(tmp_path / "ct.toml", 'kind = "folder"\npath = "dicom"', 'modality = "CT"')
    excluded = _check(ct, "--format", "json", "--manifest-out", str(tmp_path / "m.json"))
    assert excluded.exit_code == 1
    report = json.loads(excluded.output)
    assert (report["series"], report["series_selected"], report["series_excluded"]) == (3, 0, 3)
    missing = _check(_config(tmp_path / "none.toml", 'kind = "folder"\npath = "nowhere"'))
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_manifest_holds_no_identifying_value(tmp_path: Path, synthetic_sites: list[Path],
                                             fedseg_home: Path) -> None:
    config = _config(tmp_path / "site.toml", f'kind = "folder"\npath = "{synthetic_sites[0]}"')
    manifest_path = tmp_path / "manifest.json"
    result = _check(config, "--manifest-out", str(manifest_path))
    assert result.exit_code == 0, result.output
    text = manifest_path.read_text()
    files = sorted(synthetic_sites[0].rglob("*.dcm"))
    secrets = _identifying_values(files)
    assert {"SYN^A001", "SYN-A001", "Synthetic Hospital A"} <= secrets  # the scan found real values
    leaked = sorted(v for v in secrets if v in text)
    assert not leaked, f"manifest leaks {leaked}"
    assert "SYN" not in text and "/" + synthetic_sites[0].name not in text  # no ids, no paths
    manifest = json.loads(text)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
    plain = {hashlib.sha256(u.encode()).hexdigest()[:32] for u in uids}
    assert not plain & {row["id"] for row in manifest["series"]}  # keyed, not a bare hash
    assert manifest["counts"]["series_usable"] == 4 and manifest["vendors"] == {"Acme Medical": 4}
    key = fedseg_home / "keys" / "hospital-q-manifest.key"
    assert key.stat().st_mode & 0o077 == 0  # the HMAC key is the site's alone
    again = _check(config, "--manifest-out", str(manifest_path))
    assert json.loads(manifest_path.read_text())["series"] == manifest["series"]  # stable ids
    assert again.exit_code == 0


def test_site_check_on_orthanc(tmp_path: Path, synthetic_sites: list[Path],
                               orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for site in synthetic_sites:
        orthanc.upload(sorted(site.rglob("*.dcm")))
    config = _config(tmp_path / "pacs.toml", f'kind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"',
                     'modality = ["MR"]\nmin_slices = 8')
    monkeypatch.setenv("FEDSEG_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("FEDSEG_PACS_PASSWORD", orthanc.password)
    manifest_path = tmp_path / "manifest.json"
    result = _check(config, "--format", "json", "--manifest-out", str(manifest_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["source"]["kind"] == "dicomweb"
    assert (report["series"], report["series_usable"], report["slices_usable"]) == (4, 4, 32)
    assert report["masks"] == {"found": 4, "missing": 0, "unusable": 0}
    assert report["vendors"] == {"Acme Medical": 4} and report["problems"] == []
    assert report["sync"]["series_fetched"] == 8
    text = manifest_path.read_text()
    assert not [v for v in _identifying_values(sorted(synthetic_sites[0].rglob("*.dcm"))) if v in text]

    strict = _config(tmp_path / "strict.toml", f'kind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"',
                     "min_slices = 9")
    excluded = _check(strict, "--format", "json", "--manifest-out", str(manifest_path))
    assert excluded.exit_code == 1
    report = json.loads(excluded.output)
    assert (report["series"], report["series_excluded"], report["usable"]) == (8, 8, False)

    monkeypatch.setenv("FEDSEG_PACS_PASSWORD", "wrong")
    refused = _check(config, "--manifest-out", str(manifest_path))
    assert refused.exit_code == 1 and "refused the node's credentials" in refused.output
