"""Nothing identifying leaves a site: real rounds through the real ClientApp, every reply it sends
(Flower's serialized objects) and everything the coordinator writes to MLflow, searched for the
sites' patient names, IDs, birth and study dates, UIDs, institutions and accession numbers."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flower_messages import coded_failure, instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from imaging.dicom_seg import write_seg
from imaging.dicom_write import write_series
from imaging.failure_codes import (FAILURE_CODES, PROBLEM_KINDS, UnsafeFailureValue, new_failure_ref, parse_failure,
                                   render_failure, rule_name)
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import default_store
from server.config import FederationConfig
from server.federation import run_federation
from server.screened_grid import ScreenedGrid, screen_error
from simulation.engine import default_app_dir, fused_run_config
from simulation.synthetic import phantom, site_params

pytestmark = pytest.mark.privacy
SITE_LOCAL = {"audit", "ledgers", "cache"}  # what the in-process sites keep in the shared FEDSEG_HOME


def _date_variants(yyyymmdd: str) -> list[str]:
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:]
    return [yyyymmdd, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"]


def _write_phi_site(root: Path, s: int, patients: int = 4, slices: int = 8,
                    folder_name: str | None = None) -> tuple[Path, set[str]]:
    """A hospital folder of real DICOM (series + SEG) full of distinctive identifying values.

    The folder is ``hospital-a`` (b, c, ...) or ``folder_name``; inside, ``<PatientID>/<StudyUID>/``.
    """
    site = root / (folder_name or f"hospital-{'abcdef'[s]}")
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
        if reply.has_error():  # a code naming the rule; the policy file's path stays at the site
            assert reply.error.reason.startswith("FEDSEG-POLICY-001: refused by site policy rule [privacy] "
                                                 "require_dp; ref "), reply.error.reason
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


# ------------------------------------------------------------------ failure paths
# Planted values an exception's text could carry out of a site: paths named by patient and study,
# UIDs, names, institutions. Built at run time, so that no source file (the app package that the
# SuperLink stores holds this one) contains them.
def _planted(tag: str) -> dict[str, str]:
    return {
        "patient_name": f"Quokkafeld{tag}^Zenobia", "patient_id": f"MRN{tag}4471",
        "study_uid": f"1.2.826.0.1.3680043.9.7731.{int(tag, 16)}.1", "institution": f"St Wombatsby {tag} Infirmary",
        "path": f"/data/pacs-export/MRN{tag}4471/1.2.826.0.1.3680043.9.7731.{int(tag, 16)}.1/IM0001.dcm",
    }


_GOOD_VALUES = {"_Count": 3, "_Number": 1.5, "_Rule": "privacy.require_dp", "_Digest": "ab" * 32}


def _good_value(kind: object) -> object:
    name = type(kind).__name__
    if name == "_Label":
        return kind.words[0]
    if name == "_LabelCounts":
        return {kind.words[0]: 2}
    return _GOOD_VALUES[name]


def test_every_failure_template_renders_only_allow_listed_values() -> None:
    planted = list(_planted("C0FFEE").values())
    ref = new_failure_ref()
    for code in FAILURE_CODES.values():
        good = {name: _good_value(kind) for name, kind in code.fields.items()}
        text = code.render(ref=ref, **good)
        parsed = parse_failure(text)
        assert parsed is not None and parsed.code is code and parsed.ref == ref, text
        assert text.startswith(f"{code.code}: ") and text.endswith(f"; ref {ref}")
        for name, kind in code.fields.items():
            wrong = [*planted, {planted[1]: 1}, float("nan"), True, -1, None]
            for bad in wrong:
                if type(kind).__name__ == "_Number" and bad == -1:
                    continue  # a negative number is a number
                with pytest.raises(UnsafeFailureValue):
                    code.render(ref=ref, **{**good, name: bad})
        with pytest.raises(UnsafeFailureValue):  # the ref is random hex, never a value
            code.render(ref=planted[1], **good)
        with pytest.raises(UnsafeFailureValue):  # no field a template does not name
            code.render(ref=ref, **good, detail=planted[0])
        # the coordinator's parser accepts the rendered text only, not an edited one
        assert parse_failure(text.replace(f"; ref {ref}", f" {planted[1]}; ref {ref}")) is None
        assert parse_failure(f"{text} {planted[0]}") is None
    # rule names: any [section] key the policy may grow, in either spelling, and nothing else
    assert rule_name("privacy.min_noise_multiplier") == "[privacy] min_noise_multiplier"
    assert rule_name("[evaluation] max_evaluations") == "[evaluation] max_evaluations"
    assert rule_name("apps") == "[apps]"
    for bad in ("privacy.require_dp; MRN4471", "[Privacy] require_dp", "a.b.c", ""):
        with pytest.raises(UnsafeFailureValue):
            rule_name(bad)


def test_every_failure_code_is_documented_for_hospital_it() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [code for code in FAILURE_CODES if f"`{code}`" not in readme]
    assert missing == [], f"README's failure-code table lacks {missing}"


def test_problem_kinds_are_the_template_vocabulary(tmp_path: Path) -> None:
    from imaging.errors import (DicomReadError, NotDicomError, SegmentAlignmentError, SegmentationError,
                                SeriesError, UnsupportedTransferSyntaxError)
    from imaging.site_folder import problem_kind, scan_site

    for exc in (DicomReadError("x"), NotDicomError("x"), SegmentAlignmentError("x"), SegmentationError("x"),
                SeriesError("x"), UnsupportedTransferSyntaxError("x")):
        assert problem_kind(exc) in PROBLEM_KINDS
    (tmp_path / "MRN1.dcm").write_bytes(b"not dicom")
    (problem,) = scan_site(tmp_path).problems
    assert problem.kind == "not-dicom" and "MRN1.dcm" in problem.reason  # the text stays at the site


class _Answer500(BaseHTTPRequestHandler):
    """A PACS that answers every request with HTTP 500 and identifying text in the body."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _pacs_answering_500(body: str) -> Iterator[str]:
    handler = type("Answer500", (_Answer500,), {"body": body.encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _round_message(kind: str, **overrides: object) -> Message:
    config = RoundInstructions(spec=ModelSpec(channels=(8, 16), image_size=32), batch_size=8, **overrides).to_config()
    config["server-round"] = 1
    return instruction(RecordDict({"arrays": ArrayRecord(build_unet(ModelSpec(channels=(8, 16), image_size=32))
                                                         .state_dict()),
                                   "config": ConfigRecord(config)}), kind)


def test_each_failure_leaves_a_site_as_its_code_and_its_text_stays_in_the_audit_log(
    tmp_path: Path, fedseg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ClientApp's edge in process, one failure of each kind, PHI planted in each text."""
    values = _planted("5EED")
    good, site_phi = _write_phi_site(tmp_path / "sites", 0, patients=3, folder_name=values["institution"])
    phi = set(values.values()) | site_phi
    app = create_client_app()
    unreadable = tmp_path / "sites" / f"{values['institution']} export"
    (unreadable / values["patient_id"]).mkdir(parents=True)
    (unreadable / values["patient_id"] / f"{values['study_uid']}.dcm").write_bytes(b"\x00" * 300)
    strict = tmp_path / values["patient_id"] / "policy.toml"  # a refusal's text names the policy file
    strict.parent.mkdir()
    strict.write_text("[privacy]\nrequire_dp = true\n")

    def run(name: str, node_config: dict, kind: str = MessageType.TRAIN) -> Message:
        context = Context(run_id=9, node_id=1, state=RecordDict(), run_config={},
                          node_config={"site-name": name, "cache-dir": "none", **node_config})
        return app(_round_message(kind), context)

    with _pacs_answering_500(f"no study {values['study_uid']} for {values['patient_name']}") as pacs:
        replies = {
            "FEDSEG-DATA-001": run("h-unreadable", {"data-dir": str(unreadable)}),
            "FEDSEG-PACS-002": run("h-pacs", {"pacs-url": f"{pacs}/{values['patient_id']}/dicom-web"}),
            "FEDSEG-POLICY-001": run("h-strict", {"data-dir": str(good), "policy-file": str(strict)}),
            "FEDSEG-SITE-001": run("h-gone", {"data-dir": values["path"]}),
        }
    # a crash in training: whatever it says stays at the site
    monkeypatch.setattr("client.handlers.train_epochs",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError(f"CUDA error in {values['path']}")))
    replies["FEDSEG-INTERNAL"] = run("h-crash", {"data-dir": str(good)})

    for code, reply in replies.items():
        name = {"FEDSEG-DATA-001": "h-unreadable", "FEDSEG-PACS-002": "h-pacs", "FEDSEG-POLICY-001": "h-strict",
                "FEDSEG-SITE-001": "h-gone", "FEDSEG-INTERNAL": "h-crash"}[code]
        audit = fedseg_home / "audit" / f"{name}.jsonl"
        failure = coded_failure(reply, code, audit if audit.exists() else None)
        assert _leaks(failure["sent"], phi) == [], failure["sent"]
        if code != "FEDSEG-SITE-001":  # no site, no audit log: the site's log has it (below)
            assert _leaks(failure["audit"]["reason"], phi), failure["audit"]  # the full text is kept
    assert replies["FEDSEG-PACS-002"].error.reason.startswith("FEDSEG-PACS-002: the PACS answered HTTP 500; ref ")
    assert coded_failure(replies["FEDSEG-DATA-001"], "FEDSEG-DATA-001")["problems"] == {"not-dicom": 1}


@pytest.mark.adversarial
def test_the_coordinator_withholds_error_text_that_is_not_a_failure_code(tmp_path: Path) -> None:
    """A site running some other ClientApp sends an exception's text: no log or journal sees it."""
    values = _planted("BADA")
    raw = ClientApp()

    @raw.train()
    def train(message: Message, context: Context) -> Message:
        raise RuntimeError(f"cannot read {values['path']} of {values['patient_name']}")

    grid = LocalGrid(raw, 2)
    screened = ScreenedGrid(grid)
    coded = render_failure("FEDSEG-DATA-002", ref=new_failure_ref(), role="training", patients=1)
    messages = [screened.create_message(RecordDict(), MessageType.TRAIN, node, "1") for node in screened.get_node_ids()]
    replies = list(screened.send_and_receive(messages))
    assert len(replies) == 2
    for reply in replies:
        assert reply.error.reason == "Flower UNKNOWN: reason withheld (not a fedseg failure code)"
    raw_text = f"RuntimeError: cannot read {values['path']}"
    assert screen_error(Error(code=2, reason=raw_text)).reason == (
        "Flower CLIENT_APP_RAISED_EXCEPTION: reason withheld (not a fedseg failure code)")
    kept = screen_error(Error(code=2, reason=coded))
    assert kept.reason == coded  # a fedseg failure code passes as it is


# ------------------------------------------------------------------ over a real SuperLink
_CRASH_IN_TRAINING = '''\
"""Fault injection for tests/test_no_phi.py: this node's training crashes with $PHI_CRASH_MESSAGE."""
import importlib.abc
import importlib.util
import os
import sys


class _CrashTraining(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "imaging.training":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)

            def train_epochs(*args, **kwargs):
                raise RuntimeError(os.environ["PHI_CRASH_MESSAGE"])

            module.train_epochs = train_epochs

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CrashTraining())
'''


def _break_site(site: Path) -> None:
    """Patient 1's series re-saved 4 pixels smaller (its SEG no longer fits: seg-misaligned);
    patient 2's images overwritten with bytes that are not DICOM (not-dicom; its SEG: seg-orphan)."""
    patients = sorted(p for p in site.iterdir() if p.is_dir())
    for path in patients[0].rglob("series/*"):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[:-4, :-4].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.save_as(path)
    for path in patients[1].rglob("series/*"):
        path.write_bytes(b"\x00not a DICOM file " + path.name.encode() * 20)


def _site_config(configs: Path, name: str, source: str, extra: str = "") -> Path:
    path = configs / name / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[site]\nname = "{name}"\n{extra}\n[source]\n{source}\n')
    return path


@pytest.mark.adversarial
@pytest.mark.deployment
@pytest.mark.slow
def test_failures_at_four_sites_leave_nothing_identifying_at_the_coordinator(tmp_path: Path) -> None:
    """One real run, five SuperNodes: one healthy site and four that fail, each with identifying
    values in its error's text. The SuperLink's database, every coordinator log, the journal and
    the MLflow store are searched byte for byte; the failing sites' audit logs must hold the text."""
    from deployment_harness import Deployment

    sites, configs = tmp_path / "sites", tmp_path / "site-configs"
    ok, phi = _write_phi_site(sites, 0, folder_name="St Wombatsby Infirmary 0")
    # unreadable files and a misaligned SEG (the folder is named as a hospital names it)
    broken, values = _write_phi_site(sites, 1, patients=2, folder_name="St Wombatsby Infirmary 1")
    phi |= values
    _break_site(broken)
    strict, values = _write_phi_site(sites, 2, folder_name="St Wombatsby Infirmary 2")
    phi |= values
    (strict / "policy.toml").write_text("[privacy]\nrequire_dp = true\n")
    crash, values = _write_phi_site(sites, 3, folder_name="St Wombatsby Infirmary 3")
    phi |= values
    crash_file = next(crash.rglob("series/*"))
    crash_message = f"CUDA error: an illegal memory access reading {crash_file}"
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_CRASH_IN_TRAINING)
    pacs_values = _planted("BAC5")
    phi |= set(pacs_values.values())
    pacs_body = f"query failed for {pacs_values['patient_name']} ({pacs_values['patient_id']}) {pacs_values['path']}"

    failing = {"hospital-broken": "FEDSEG-DATA-001", "hospital-pacs": "FEDSEG-PACS-002",
               "hospital-strict": "FEDSEG-POLICY-001", "hospital-crash": "FEDSEG-INTERNAL"}
    with _pacs_answering_500(pacs_body) as pacs, Deployment.start(tmp_path / "federation") as dep:
        dep.add_site("hospital-ok", _site_config(configs, "hospital-ok", f'kind = "folder"\npath = "{ok}"'))
        dep.add_site("hospital-broken", _site_config(configs, "hospital-broken", f'kind = "folder"\npath = "{broken}"'))
        dep.add_site("hospital-strict", _site_config(configs, "hospital-strict", f'kind = "folder"\npath = "{strict}"',
                                                     f'policy_file = "{strict / "policy.toml"}"'))
        dep.add_site("hospital-pacs", _site_config(
            configs, "hospital-pacs", f'kind = "dicomweb"\nurl = "{pacs}/{pacs_values["patient_id"]}/dicom-web"'))
        dep.add_site("hospital-crash", _site_config(configs, "hospital-crash", f'kind = "folder"\npath = "{crash}"'),
                     env={"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]),
                          "PHI_CRASH_MESSAGE": crash_message})
        dep.wait_activated()
        run = dep.run_app("num-server-rounds=1 min-sites=1 model-name='phi-unet' image-size=32 "
                          "unet-channels='8,16' batch-size=8 join-timeout=120.0")
        status = dep.run_status(run.run_id)
        assert status["status"] == "finished:completed", f"{status}\n{run.output[-4000:]}\n{dep.logs()}"
        coordinator_logs = run.output + dep.superlink.log()
        site_logs = {name: node.log() for name, node in dep.supernodes.items()}

    # every failure reached the coordinator, as its code
    assert "aggregate_train: Received 1 results and 4 failures" in run.output, run.output[-4000:]
    for site, code in failing.items():
        assert code in run.output, (site, code, run.output[-4000:])
    assert "refused by site policy rule [privacy] require_dp" in run.output
    assert "reason withheld" not in run.output  # every site sent a code, none was screened out

    # the search: every coordinator-side file, byte for byte (the SuperLink's database and its WAL,
    # every process log, the `flwr run` stream, the journal, MLflow's sqlite store and artifacts)
    coordinator = [p for p in (tmp_path / "federation").rglob("*")
                   if p.is_file() and "sites-home" not in p.relative_to(tmp_path / "federation").parts]
    names = {p.name for p in coordinator}
    assert {"superlink.db", "mlflow.db", "journal.json"} <= names, sorted(names)
    assert any("dossier" in n for n in names), sorted(names)
    searched = {p: p.read_bytes().decode("latin-1") for p in coordinator}
    database = "".join(text for p, text in searched.items() if p.name.startswith("superlink.db"))
    assert all(code in database for code in failing.values())  # the error replies are in it
    assert "hospital-broken" in "".join(searched.values())  # the search reaches what the sites sent
    leaks = {str(p): found for p, text in searched.items() if (found := _leaks(text, phi))}
    assert leaks == {}
    assert _leaks(coordinator_logs, phi) == []

    # ... while each failing site's own audit log (and log) kept the full failure
    for site, code in failing.items():
        audit = tmp_path / "federation" / "sites-home" / site / "fedseg" / "audit" / f"{site}.jsonl"
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        (failure,) = [r for r in lines if r.get("code") == code and r.get("kind") == "train"]
        assert failure["event"] == ("refusal" if code == "FEDSEG-POLICY-001" else "failure"), failure
        assert _leaks(failure["reason"], phi), failure  # the text that did not leave
        assert failure["sent"] in run.output  # what did
        assert failure["ref"] in site_logs[site], site_logs[site][-3000:]
    assert crash_message in (tmp_path / "federation" / "sites-home" / "hospital-crash" / "fedseg" / "audit"
                             / "hospital-crash.jsonl").read_text()
