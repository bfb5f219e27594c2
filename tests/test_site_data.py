"""Site folders: scanning, synthetic hospitals, the LGG import and the `simulate` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from imaging.errors import DataError
from imaging.site_folder import load_case, scan_site
from simulation.cli import simulate
from simulation.lgg import import_lgg
from simulation.synthetic import phantom, site_params, write_synthetic_sites

LGG = Path("/work/shared/data/lgg-flair128")
needs_lgg = pytest.mark.skipif(not (LGG / "CS.npz").is_file(), reason="LGG data not available")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("sites")
    return write_synthetic_sites(out, sites=3, patients_per_site=3, slices=8, size=48, seed=7)


def test_synthetic_sites_differ_like_scanners(synthetic: list[Path]) -> None:
    assert [s.name for s in synthetic] == ["site-a", "site-b", "site-c"]
    infos = [json.loads((s / "site.json").read_text()) for s in synthetic]
    assert len({i["manufacturer"] for i in infos}) == 3
    assert {i["modality"] for i in infos} == {"MR", "CT"}
    for site, info in zip(synthetic, infos):
        scan = scan_site(site)
        assert scan.problems == []
        assert len(scan.cases) == 3 and len(scan.labelled) == 3
        assert info["patients_with_lesions"] >= 1
        volumes = [load_case(c) for c in scan.cases]
        for (vol, mask), case in zip(volumes, scan.cases):
            assert vol.manufacturer == info["manufacturer"] and vol.patient_id == case.patient_id
            assert case.patient_id.startswith("SYN-")
            assert mask is not None and mask.shape == vol.shape == (8, info["rows"], info["cols"])
        assert any(m.any() for _, m in volumes), "each site has lesions"
        assert sum(int(m.any(axis=(1, 2)).sum()) for _, m in volumes) == info["lesion_slices"]


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_lesion_contrast_is_clear(index: int) -> None:
    p = site_params(index, size=48, seed=3)
    stored, mask = phantom(p, 8, 2, np.random.default_rng(index))
    assert mask.any()
    body_level = p.intensity_offset + p.intensity_scale + (24 if p.modality == "CT" else 0)
    step = np.abs(stored[mask > 0].astype(float) - body_level)
    # lesions differ from the body by 0.4..0.8 of the signal, far above the site's noise
    assert np.median(step) > max(0.35, 4 * p.noise) * p.intensity_scale


def test_synthetic_is_deterministic(tmp_path: Path, synthetic: list[Path]) -> None:
    again = write_synthetic_sites(tmp_path, sites=1, patients_per_site=3, slices=8, size=48, seed=7)
    a, b = scan_site(synthetic[0]).cases[0], scan_site(again[0]).cases[0]
    assert a.series_uid == b.series_uid
    (va, ma), (vb, mb) = load_case(a), load_case(b)
    np.testing.assert_array_equal(va.pixels, vb.pixels)
    np.testing.assert_array_equal(ma, mb)


def test_scan_records_problems_and_skips_hidden(tmp_path: Path, synthetic: list[Path]) -> None:
    site = tmp_path / "mixed"
    shutil.copytree(synthetic[1], site)
    (site / "junk.bin").write_bytes(b"\x00" * 300)
    (site / ".DS_Store").write_bytes(b"hidden")
    (site / "deep" / ".git").mkdir(parents=True)
    (site / "deep" / ".git" / "x").write_text("hidden dir")
    # a second series of one patient, under an odd name, without a SEG
    case = scan_site(synthetic[1]).cases[0]
    extra = site / "deep" / "other"
    extra.mkdir()
    for i, f in enumerate(case.files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.SOPInstanceUID = f"1.2.3.4.5.{i}"
        ds.save_as(extra / f"x{i}", enforce_file_format=True)
    scan = scan_site(site)
    assert [p.path.name for p in scan.problems] == ["junk.bin"]
    assert "not a DICOM file" in scan.problems[0].reason
    assert len(scan.cases) == 4 and len(scan.labelled) == 3
    other = next(c for c in scan.cases if c.series_uid == "1.2.3.4.5")
    vol, mask = load_case(other)
    assert mask is None and vol.patient_id == case.patient_id


def test_scan_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_site(tmp_path / "nope")


@needs_lgg
def test_import_lgg_subset(tmp_path: Path) -> None:
    sites = import_lgg(LGG, tmp_path, sites=["CS", "FG"], max_patients_per_site=2)
    assert [s.name for s in sites] == ["lgg-CS", "lgg-FG"]
    src = np.load(LGG / "CS.npz")
    scan = scan_site(sites[0])
    assert scan.problems == [] and len(scan.labelled) == 2
    case = scan.cases[0]
    vol, mask = load_case(case)
    rows = np.flatnonzero(src["patient"] == case.patient_id)
    rows = rows[np.argsort(src["slice_index"][rows])]
    assert vol.geometry_assumed and vol.spacing == (3.0, 2.0, 2.0) and vol.modality == "MR"
    np.testing.assert_array_equal(vol.pixels, src["image"][rows])
    np.testing.assert_array_equal(mask, src["mask"][rows])
    assert json.loads((sites[0] / "site.json").read_text())["patients"] == 2


@needs_lgg
def test_import_lgg_merges_ez(tmp_path: Path) -> None:
    sites = import_lgg(LGG, tmp_path, sites=["CS"], include_ez=True, max_patients_per_site=1)
    info = json.loads((sites[0] / "site.json").read_text())
    assert info["merged_from"] == ["EZ"] and info["patients"] == 1


def test_cli_sites_and_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["sites", "--out", str(out), "--sites", "2", "--patients", "1", "--slices", "4", "--size", "32"]
    res = runner.invoke(simulate, args)
    assert res.exit_code == 0, res.output
    assert "site-a" in res.output and "site-b" in res.output and "lesions in 1/1" in res.output

    res = runner.invoke(simulate, args)  # not empty, no --force
    assert res.exit_code == 2 and "--force" in res.output and "Traceback" not in res.output
    assert runner.invoke(simulate, [*args, "--force"]).exit_code == 0

    res = runner.invoke(simulate, ["sites", "--out", str(tmp_path / "x"), "--sites", "0"])
    assert res.exit_code == 2 and "--sites" in res.output

    res = runner.invoke(simulate, ["import-lgg", str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "does not exist" in res.output

    empty = tmp_path / "empty-src"
    empty.mkdir()
    res = runner.invoke(simulate, ["import-lgg", str(empty), "--out", str(tmp_path / "z")])
    assert res.exit_code == 1 and "CS.npz not found" in res.output and res.exception is not None
    assert isinstance(res.exception, SystemExit)
