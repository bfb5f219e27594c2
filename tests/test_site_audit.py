"""The site's hash-chained audit log: tamper detection, concurrent writers, and what the real
ClientApp records for a run, its rounds, its data access and a refusal."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from flower_messages import coded_failure, instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from client.app import create_client_app
from client.audit import AuditLog, line_hash, verify_audit_log
from client.cli import site as site_cli
from client.errors import AuditError
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec

SPEC = ModelSpec(channels=(8, 16), image_size=32)


def _log(path: Path, n: int = 5) -> list[str]:
    log = AuditLog(path)
    for i in range(n):
        log.append("round-start", run_id="1", round=i + 1, kind="train")
    return path.read_text().splitlines(keepends=True)


def _verify(path: Path) -> dict:
    result = CliRunner().invoke(site_cli, ["audit", "verify", "--audit-file", str(path), "--format", "json"])
    report = json.loads(result.output)
    assert (result.exit_code == 0) == report["ok"], result.output
    return report


def test_an_intact_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _log(path)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == "0" * 64
    assert all(r["prev"] == p["hash"] == line_hash(p) for p, r in zip(records, records[1:]))
    report = _verify(path)
    assert report["ok"] and report["lines"] == 5 and report["head"] == {"seq": 5, "hash": records[-1]["hash"]}


@pytest.mark.parametrize(
    ("tamper", "bad_line", "reason"),
    [
        ("edit", 3, "edited"),
        ("edit-rehash", 4, "prev hash"),
        ("remove", 3, "prev hash"),
        ("insert", 5, "prev hash"),  # the forged line is self-consistent: its successor breaks
        ("reorder", 2, "prev hash"),
        ("truncate", 5, "incomplete last line"),
        ("garbage", 2, "not a JSON"),
    ],
)
def test_tampering_is_detected_and_the_first_bad_line_named(tmp_path: Path, tamper: str, bad_line: int,
                                                            reason: str) -> None:
    path = tmp_path / "a.jsonl"
    lines = _log(path)
    if tamper == "edit":  # change a value, keep the old hash
        lines[2] = lines[2].replace('"round":3', '"round":9')
    elif tamper == "edit-rehash":  # change a value and recompute that line's own hash
        record = json.loads(lines[2])
        record["round"] = 9
        record["hash"] = line_hash(record)
        lines[2] = json.dumps(record) + "\n"
    elif tamper == "remove":
        del lines[2]
    elif tamper == "insert":  # a forged, self-consistent line after line 3
        record = json.loads(lines[2])
        record.update(seq=4, prev=record["hash"], event="refusal")
        record["hash"] = line_hash(record)
        lines.insert(3, json.dumps(record) + "\n")
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif tamper == "garbage":
        lines[1] = "not json\n"
    path.write_text("".join(lines))
    report = _verify(path)
    assert not report["ok"]
    assert report["bad_line"] == bad_line and reason in report["reason"]

    text = CliRunner().invoke(site_cli, ["audit", "verify", "--audit-file", str(path)])
    assert text.exit_code == 1 and f"line {bad_line}" in text.output


def test_lines_deleted_from_the_end_are_caught_with_a_recorded_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _log(path)
    head = verify_audit_log(path)
    anchor = f"{head.head_seq}:{head.head_hash}"
    assert verify_audit_log(path, expect_head=anchor).ok
    path.write_text("".join(lines[:-1]))
    assert verify_audit_log(path).ok  # a shorter chain is still a chain ...
    report = verify_audit_log(path, expect_head=anchor)  # ... but not the one recorded
    assert not report.ok and "expected head" in report.reason


def test_an_incomplete_last_line_stops_further_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _log(path, 2)
    path.write_text(path.read_text()[:-10])
    with pytest.raises(AuditError, match="incomplete line"):
        AuditLog(path).append("round-start", run_id="1")


def _writer(path: str, worker: int) -> None:
    log = AuditLog(Path(path))
    for i in range(20):
        log.append("round-start", run_id=str(worker), round=i)


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    assert all(p.exitcode == 0 for p in workers)
    report = verify_audit_log(path)
    assert report.ok and report.lines == 80
    records = AuditLog(path).records()
    assert sorted((r["run_id"], r["round"]) for r in records) == sorted(
        (str(w), i) for w in range(4) for i in range(20))


# ------------------------------------------------------------------ the real ClientApp


def _message(kind: str, server_round: int, run_id: int = 7, **overrides) -> object:
    config = RoundInstructions(spec=SPEC, batch_size=8, **overrides).to_config()
    config["server-round"] = server_round
    return instruction(RecordDict({"arrays": ArrayRecord(build_unet(SPEC).state_dict()),
                                   "config": ConfigRecord(config)}), kind, run_id=run_id)


def test_the_client_app_audits_runs_rounds_data_access_and_refusals(synthetic_sites: list[Path],
                                                                     tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(synthetic_sites[0], site)
    audit_file = tmp_path / "it" / "audit.jsonl"
    context = Context(run_id=7, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(site), "site-name": "h1", "audit-file": str(audit_file),
                                   "cache-dir": "none"})
    app = create_client_app()
    reply = app(_message(MessageType.TRAIN, 1), context)
    app(_message(MessageType.EVALUATE, 1), context)
    (site / "policy.toml").write_text("[training]\nmax_local_epochs = 1\n")
    refused = coded_failure(app(_message(MessageType.TRAIN, 2, local_epochs=3), context), "FEDSEG-POLICY-001",
                            audit_file)
    assert refused["rule"] == "[training] max_local_epochs"

    records = AuditLog(audit_file).records()
    events = [(r["event"], r.get("kind")) for r in records]
    assert events == [
        ("run", None),
        ("round-start", "train"), ("admitted", "train"), ("data-access", "train"), ("round-result", "train"),
        ("round-start", "evaluate"), ("admitted", "evaluate"), ("data-access", "evaluate"),
        ("round-result", "evaluate"),
        ("round-start", "train"), ("refusal", "train"),
    ]
    run = records[0]
    assert run["run_id"] == "7" and run["site"] == "h1" and run["app"]["fab_id"] == "fedseg/fedseg"
    assert records[2]["count"] == 1  # the run's first train message to read data (max_rounds counts these)
    access = records[3]
    assert access["manifest_sha256"] == reply.content["site"]["manifest-sha256"]
    assert access["series"] == 4 and access["slices"] == 32
    assert access["train_slices"] + access["test_slices"] == 32
    result = records[4]
    assert result["metrics"]["num-examples"] == reply.content["metrics"]["num-examples"]
    assert result["dropped_metrics"] == []
    refusal = records[-1]
    assert refusal["rule"] == "training.max_local_epochs" and refusal["round"] == 2
    assert "at most 1 local epochs" in refusal["reason"]
    assert refusal["code"] == "FEDSEG-POLICY-001" and refusal["sent"] == refused["sent"]

    assert verify_audit_log(audit_file).ok
    shown = CliRunner().invoke(site_cli, ["audit", "show", "--audit-file", str(audit_file),
                                          "--event", "refusal", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert [r["rule"] for r in json.loads(shown.output)] == ["training.max_local_epochs"]
    table = CliRunner().invoke(site_cli, ["audit", "show", "--audit-file", str(audit_file)])
    assert table.exit_code == 0 and "data-access" in table.output


def test_the_default_audit_log_is_per_site_under_fedseg_home(synthetic_sites: list[Path],
                                                             fedseg_home: Path) -> None:
    context = Context(run_id=3, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(synthetic_sites[1]), "site-name": "h2"})
    create_client_app()(_message(MessageType.EVALUATE, 1, run_id=3), context)
    path = fedseg_home / "audit" / "h2.jsonl"
    assert [r["event"] for r in AuditLog(path).records()] == ["run", "round-start", "admitted",
                                                             "data-access", "round-result"]
    result = CliRunner().invoke(site_cli, ["audit", "verify", "--site-name", "h2"])
    assert result.exit_code == 0 and "OK" in result.output
