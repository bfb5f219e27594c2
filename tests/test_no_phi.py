"""Nothing identifying leaves a site: real rounds through the real ClientApp, every reply it sends
(Flower's serialized objects) and everything the coordinator writes to MLflow, searched for the
sites' patient names, IDs, birth and study dates, UIDs, institutions and accession numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from imaging.dicom_seg import write_seg
from imaging.dicom_write import write_series
from registry import default_store
from server.config import FederationConfig
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config
from simulation.synthetic import phantom, site_params

pytestmark = pytest.mark.privacy
SITE_LOCAL = {"audit", "ledgers", "cache"}  # what the in-process sites keep in the shared FEDSEG_HOME


def _date_variants(yyyymmdd: str) -> list[str]:
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:]
    return [yyyymmdd, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"]


def _write_phi_site(root: Path, s: int, patients: int = 4, slices: int = 8) -> tuple[Path, set[str]]:
    """A hospital folder of real DICOM (series + SEG) full of distinctive identifying values."""
    site = root / f"hospital-{'abc'[s]}"
    params = site_params(s, size=32, seed=11)
    phi: set[str] = set()
    for i in range(patients):
        family, given = f"Quokkafeld{s}{i}", f"Zenobia{s}{i}x"
        pid = f"MRN{s}{i}7731904"
        birth, study_date = f"195{s}0{i + 1}1{i}", f"20190{i + 1}2{s}"
        study_uid = f"1.2.826.0.1.3680043.9.7731.{s}.{i}.1"
        series_uid = f"1.2.826.0.1.3680043.9.7731.{s}.{i}.2"
        institution, accession = f"St Wombatsby Infirmary {s}", f"ACC{s}{i}88123"
        stored, mask = phantom(params, slices, 1 + i % 2, np.random.default_rng([s, i]))
        folder = site / pid / study_uid  # the folders are named as a PACS export names them
        files = write_series(folder / "series", stored, patient_id=pid, patient_name=f"{family}^{given}",
                             study_uid=study_uid, series_uid=series_uid, modality=params.modality,
                             institution=institution, accession_number=accession, study_date=study_date,
                             study_time="101500", study_id=f"STY{s}{i}55", manufacturer=params.manufacturer,
                             uid_seed=f"phi-{s}-{i}")
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientBirthDate = birth
            ds.SeriesDate = ds.AcquisitionDate = study_date
            ds.ReferringPhysicianName = f"Drumblewick{s}{i}^Ottoline"
            ds.save_as(path)
            phi.update({ds.SOPInstanceUID, str(ds.FrameOfReferenceUID)})
        write_seg(folder / "seg.dcm", files, mask, uid_seed=f"phi-seg-{s}-{i}")
        seg = pydicom.dcmread(folder / "seg.dcm")
        assert str(seg.PatientID) == pid and str(seg.StudyInstanceUID) == study_uid  # the SEG carries them too
        phi.update({seg.SOPInstanceUID, seg.SeriesInstanceUID})
        phi.update({family, given, pid, study_uid, series_uid, institution, accession, f"STY{s}{i}55",
                    f"Drumblewick{s}{i}", *_date_variants(birth), *_date_variants(study_date)})
    return site, phi


def _leaks(text: str, phi: set[str]) -> list[str]:
    haystack = text.lower()
    return sorted(v for v in phi if v.lower() in haystack)


def test_no_identifying_dicom_value_leaves_a_site(tmp_path: Path, fedseg_home: Path) -> None:
    sites, phi = [], set()
    for s in range(2):
        site, values = _write_phi_site(tmp_path / "sites", s)
        sites.append(site)
        phi |= values
    # a third site refuses to train (its policy requires DP): its error replies count too
    refusing = tmp_path / "sites" / "hospital-c"
    shutil.copytree(sites[0], refusing)
    (refusing / "policy.toml").write_text("[privacy]\nrequire_dp = true\n")
    # the search finds what it looks for: the sites' files are full of it
    header = pydicom.dcmread(next(sites[0].rglob("seg.dcm")))
    assert _leaks(str(header), phi)

    grid = LocalGrid(create_client_app(PartitionSites((*sites, refusing))), 3)
    config = FederationConfig.from_run_config(fused_run_config(
        default_app_dir(), "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8"))
    store = default_store()
    outcome = run_federation(grid, config, store, progress=lambda _: None)
    assert set(outcome.sites) == {"hospital-a", "hospital-b"}  # the federation went on without c

    # 1. every reply the ClientApp sent, as Flower serializes it for the wire
    # c's train replies are errors (require_dp), its evaluations (no DP rule for them) are not
    assert len(grid.replies) == 12 and sum(r.has_error() for r in grid.replies) == 2
    wire = []
    for reply in grid.replies:
        wire.append(repr(reply.metadata))
        if reply.has_error():
            assert "requires DP" in reply.error.reason
            wire.append(reply.error.reason)
        wire.extend(obj.deflate().decode("latin-1") for obj in get_all_nested_objects(reply).values())
    assert "hospital-a" in "".join(wire)  # the search reaches inside the serialized records
    assert _leaks("\n".join(wire), phi) == []

    # 2. what the coordinator recorded, through MLflow's API ...
    client = store.client()
    recorded = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            recorded.append(json.dumps({"params": run.data.params, "metrics": run.data.metrics,
                                        "tags": run.data.tags, "name": run.info.run_name}))
    for version in client.search_model_versions():
        recorded.append(json.dumps({"tags": version.tags, "description": version.description,
                                    "source": version.source}))
    assert outcome.run_id in "".join(recorded)
    assert _leaks("\n".join(recorded), phi) == []

    # ... and byte for byte: the sqlite store and every artifact file (dossier, model, spec)
    coordinator_files = [p for p in fedseg_home.rglob("*") if p.is_file()
                         and p.relative_to(fedseg_home).parts[0] not in SITE_LOCAL]
    names = {p.name for p in coordinator_files}
    assert "mlflow.db" in names and any("dossier" in n for n in names), sorted(names)
    for path in coordinator_files:
        assert _leaks(path.read_bytes().decode("latin-1"), phi) == [], path

    # 3. the sites' own audit logs keep hashes and counts only
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        audit = (fedseg_home / "audit" / f"{site}.jsonl").read_text()
        assert _leaks(audit, phi) == [], site
