"""Site data sources: a mixed DICOM folder with selection rules, and a real Orthanc through DICOMweb."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from orthanc import OrthancServer
from pydicom.uid import generate_uid

from client.errors import PacsAuthError, SiteConfigError
from client.site import Site, site_from_node_config
from client.site_config import load_site_config
from client.sources import DicomWebSource
from client.sources.multipart import iter_parts
from imaging.errors import DataError
from imaging.site_data import load_site_dataset
from imaging.spec import ModelSpec

SPEC = ModelSpec(image_size=32)
SPLIT = {"test_fraction": 0.25, "seed": 3}


def _write_config(path: Path, source: str, selection: str = "", site: str = "") -> Path:
    path.write_text(f'[site]\nname = "hospital-x"\n{site}\n[source]\n{source}\n'
                    + (f"[selection]\n{selection}\n" if selection else ""))
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path, synthetic_sites: list[Path]) -> Path:
    """Two scanners' series (MR site-a, CT site-b) in one folder; one MR series renamed FLAIR."""
    root = tmp_path / "dicom"
    for site in synthetic_sites:
        shutil.copytree(site, root / site.name)
    for f in sorted((root / "site-a" / "patients" / "SYN-A002" / "series").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "AX T2 FLAIR"
        ds.save_as(f)
    return root


def _slices(data) -> int:
    return data.num_train + data.num_test


def test_folder_source_applies_the_selection_rules(tmp_path: Path, mixed_folder: Path) -> None:
    everything = load_site_config(
        _write_config(tmp_path / "all.toml", f'kind = "folder"\npath = "{mixed_folder}"'))
    mr = load_site_config(_write_config(tmp_path / "mr.toml", 'kind = "folder"\npath = "dicom"',
                                        'modality = ["MR"]'))
    flair_rules = 'modality = "mr"\nseries_description = "(?i)flair"\nmin_slices = 8'
    flair = load_site_config(_write_config(tmp_path / "flair.toml", 'kind = "folder"\npath = "dicom"',
                                           flair_rules))
    too_few = load_site_config(_write_config(tmp_path / "few.toml", 'kind = "folder"\npath = "dicom"',
                                             "min_slices = 9"))
    assert mr.data_dir == mixed_folder  # relative to the config's folder

    all_data = everything.load_dataset(SPEC, **SPLIT)
    assert _slices(all_data) == 8 * 8
    assert all_data.vendors == {"Acme Medical": 4, "Borealis Imaging": 4}
    mr_data = mr.load_dataset(SPEC, **SPLIT)
    assert mr_data.vendors == {"Acme Medical": 4}
    assert _slices(mr_data) == 4 * 8
    flair_data = flair.load_dataset(SPEC, **SPLIT)
    assert _slices(flair_data) == 8 and flair_data.vendors == {"Acme Medical": 1}
    with pytest.raises(DataError, match="excluded by the selection rules"):
        too_few.load_dataset(SPEC, **SPLIT)


def test_the_preprocessed_cache_key_includes_the_selection(tmp_path: Path, mixed_folder: Path) -> None:
    cache = tmp_path / "cache"
    mr = load_site_config(_write_config(tmp_path / "mr.toml", 'kind = "folder"\npath = "dicom"',
                                        'modality = ["MR"]', site=f'cache_dir = "{cache}"'))
    ct = load_site_config(_write_config(tmp_path / "ct.toml", 'kind = "folder"\npath = "dicom"',
                                        'modality = ["CT"]', site=f'cache_dir = "{cache}"'))
    assert mr.cache_dir == ct.cache_dir == cache
    first = mr.load_dataset(SPEC, **SPLIT)
    assert len(list(cache.glob("*.npz"))) == 1
    assert mr.load_dataset(SPEC, **SPLIT).vendors == first.vendors == {"Acme Medical": 4}
    assert ct.load_dataset(SPEC, **SPLIT).vendors == {"Borealis Imaging": 4}  # not the MR entry


def test_site_config_paths_defaults_and_node_config(tmp_path: Path, mixed_folder: Path,
                                                    fedseg_home: Path) -> None:
    config = _write_config(tmp_path / "site.toml", 'kind = "folder"\npath = "dicom"',
                           site='audit_log = "logs/audit.jsonl"')
    site = load_site_config(config)
    assert site.name == "hospital-x"
    assert site.policy_path == tmp_path / "policy.toml"  # beside site.toml
    assert site.audit_path == tmp_path / "logs" / "audit.jsonl"
    assert site.ledger_path == fedseg_home.resolve() / "ledgers" / "hospital-x.json"
    assert site.config_file == config.resolve()
    assert site_from_node_config({"site-config": str(config)}) == site
    shortcut = site_from_node_config({"data-dir": str(mixed_folder), "site-name": "h"})
    assert shortcut.data_source.path == mixed_folder and shortcut.name == "h"
    with pytest.raises(SiteConfigError, match="only one"):
        site_from_node_config({"site-config": str(config), "data-dir": str(mixed_folder)})


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ('kind = "dicomweb"\nurl = "http://pacs:8042/dicom-web"\npassword = "s3cret"',
         "looks like a credential.*FEDSEG_PACS_PASSWORD"),
        ('kind = "dicomweb"\nurl = "http://admin:s3cret@pacs:8042/dicom-web"', "holds credentials"),
        ('kind = "dicomweb"\nurl = "http://pacs:8042/dicom-web?token=abc"', "without a query"),
        ('kind = "dicomweb"\npath = "/data"', "do not apply"),
        ('kind = "ftp"', "'folder' or 'dicomweb'"),
        ('kind = "folder"\npath = "d"\ncolour = "blue"', "unknown key"),
    ],
)
def test_site_config_refuses_credentials_and_bad_keys(tmp_path: Path, source: str, match: str) -> None:
    with pytest.raises(SiteConfigError, match=match):
        load_site_config(_write_config(tmp_path / "site.toml", source))


def test_multipart_reader_handles_any_chunking() -> None:
    parts = [b"\x00DICM" + bytes(range(256)) * 3, b"", b"\r\n--not-the-boundary\r\n" * 5]
    body = b"a preamble\r\n" + b"".join(
        b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    ) + b"--b0undary--\r\n"
    for size in (1, 3, 17, len(body)):
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        assert list(iter_parts(chunks, b"b0undary")) == parts
    from client.errors import PacsError

    with pytest.raises(PacsError, match="truncated"):
        list(iter_parts([body[:-20]], b"b0undary"))


# ------------------------------------------------------------------------------------ DICOMweb


class CountingTransport(httpx.HTTPTransport):
    """Records each request's path and whether it retrieved instances (WADO-RS)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, bool]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        wado = "multipart/related" in request.headers.get("accept", "")
        self.requests.append((request.url.path, wado))
        return super().handle_request(request)

    def retrievals(self) -> int:
        return sum(wado for _, wado in self.requests)


def _pacs_site(tmp_path: Path, server: OrthancServer, selection: str = 'modality = ["MR"]') -> Site:
    config = _write_config(tmp_path / "pacs.toml", f'kind = "dicomweb"\nurl = "{server.dicomweb_url}/"',
                           selection)
    return load_site_config(config)


def _with_transport(site: Site, transport: httpx.BaseTransport) -> Site:
    return dataclasses.replace(site, source=dataclasses.replace(site.source, transport=transport))


def _extra_slice(series_dir: Path, out: Path) -> Path:
    """A new instance one slice past the end of a series (a series that grew on the PACS)."""
    files = sorted(series_dir.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    last = max(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    step = abs(float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2]))
    last.SOPInstanceUID = generate_uid()
    last.file_meta.MediaStorageSOPInstanceUID = last.SOPInstanceUID
    last.InstanceNumber = len(files) + 1
    x, y, z = (float(v) for v in last.ImagePositionPatient)
    last.ImagePositionPatient = [x, y, z + step]
    last.save_as(out)
    return out


def test_dicomweb_source_matches_the_folder_and_fetches_only_changes(
    tmp_path: Path, synthetic_sites: list[Path], orthanc: OrthancServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for site in synthetic_sites:  # an MR site and a CT site in one PACS
        orthanc.upload(sorted(site.rglob("*.dcm")))
    monkeypatch.setenv("FEDSEG_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("FEDSEG_PACS_PASSWORD", orthanc.password)
    transport = CountingTransport()
    site = _with_transport(_pacs_site(tmp_path, orthanc), transport)
    assert site.data_source.url == orthanc.dicomweb_url  # trailing slash dropped

    from_pacs = site.load_dataset(SPEC, **SPLIT)
    from_folder = load_site_dataset(synthetic_sites[0], SPEC, **SPLIT)
    for name in ("train_images", "train_masks", "test_images", "test_masks"):
        np.testing.assert_array_equal(getattr(from_pacs, name), getattr(from_folder, name))
    assert from_pacs.manifest_sha256 == from_folder.manifest_sha256
    assert from_pacs.vendors == {"Acme Medical": 4} and not from_pacs.problems
    assert transport.retrievals() == 8  # 4 MR series + their 4 SEGs, one request each
    cached_files = sorted(site.data_dir.rglob("*.dcm"))
    assert len(cached_files) == 4 * 8 + 4
    assert not any("1.2.826" in str(f) for f in cached_files)  # no UID in the cache's paths

    # a later round: QIDO only, nothing retrieved, the same data
    transport.requests.clear()
    report = site.data_source.sync()
    assert transport.retrievals() == 0 and transport.requests
    assert (report.series_unchanged, report.series_fetched, report.series_listed) == (8, 0, 4)
    again = site.load_dataset(SPEC, **SPLIT)
    np.testing.assert_array_equal(again.train_images, from_pacs.train_images)

    # the series of patient A001 grows by one slice on the PACS: only that instance is fetched
    series_dir = synthetic_sites[0] / "patients" / "SYN-A001" / "series"
    (orthanc_id,) = orthanc.upload([_extra_slice(series_dir, tmp_path / "extra.dcm")])
    transport.requests.clear()
    report = site.data_source.sync()
    assert (report.series_fetched, report.instances_fetched, transport.retrievals()) == (1, 1, 1)
    assert len(list(site.data_dir.rglob("*.dcm"))) == 4 * 8 + 4 + 1
    grown = site.load_dataset(SPEC, **SPLIT)
    assert _slices(grown) == _slices(from_pacs) + 1

    # ... and shrinks back: the cached file goes, nothing is retrieved
    orthanc.delete_instance(orthanc_id)
    transport.requests.clear()
    report = site.data_source.sync()
    assert (report.series_fetched, report.instances_fetched, transport.retrievals()) == (1, 0, 0)
    assert sorted(site.data_dir.rglob("*.dcm")) == cached_files

    # the PACS goes away: the cache still serves the round
    orthanc.stop()
    report = site.data_source.sync()
    assert report.offline
    np.testing.assert_array_equal(site.load_dataset(SPEC, **SPLIT).train_images, from_pacs.train_images)


def test_dicomweb_selection_and_removed_series(
    tmp_path: Path, synthetic_sites: list[Path], orthanc: OrthancServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDSEG_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("FEDSEG_PACS_PASSWORD", orthanc.password)
    orthanc.upload(sorted(synthetic_sites[1].rglob("*.dcm")))  # CT only
    site = _pacs_site(tmp_path, orthanc, selection="min_slices = 8")
    report = site.data_source.sync()
    assert (report.series_listed, report.series_selected, report.series_fetched) == (4, 4, 8)
    strict = DicomWebSource(orthanc.dicomweb_url, site.data_source.cache_root,
                            selection=dataclasses.replace(site.data_source.selection, min_slices=9))
    report = strict.sync()
    assert report.series_selected == 0 and len(report.excluded) == 4
    assert "fewer than min_slices 9" in report.excluded[0]
    assert report.series_removed == 8 and not list(strict.folder.rglob("*.dcm"))


def test_wrong_or_incomplete_pacs_credentials_fail_clearly(
    tmp_path: Path, orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = _pacs_site(tmp_path, orthanc)
    monkeypatch.setenv("FEDSEG_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("FEDSEG_PACS_PASSWORD", "not-the-password")
    refused = r"refused the node's credentials \(HTTP 401.*FEDSEG_PACS_USERNAME"
    with pytest.raises(PacsAuthError, match=refused):
        site.load_dataset(SPEC, **SPLIT)
    monkeypatch.delenv("FEDSEG_PACS_PASSWORD")
    with pytest.raises(SiteConfigError, match="FEDSEG_PACS_PASSWORD is not set"):
        site.data_source.sync()
    monkeypatch.delenv("FEDSEG_PACS_USERNAME")
    with pytest.raises(PacsAuthError, match="HTTP 401"):  # no credentials at all
        site.data_source.sync()
    monkeypatch.setenv("FEDSEG_PACS_TOKEN", "abc")
    monkeypatch.setenv("FEDSEG_PACS_USERNAME", "u")
    with pytest.raises(SiteConfigError, match="not both"):
        site.data_source.sync()


def test_a_missing_orthanc_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import orthanc as helper

    monkeypatch.setattr(helper, "orthanc_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y orthanc orthanc-dicomweb"):
        helper.require_orthanc()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the PACS tests"):
        helper.require_orthanc()
