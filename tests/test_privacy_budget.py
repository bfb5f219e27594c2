"""Issue 15, item 3: the privacy budget belongs to the site's data, not to the run's names.

A coordinator controls the run config: it renames the consortium or the model, lowers σ, asks
for a large ε, sends more rounds or evaluations than the site allows. Someone with the node's
disk deletes, truncates or rewrites the ledger. Each attack goes through the real ClientApp with
real Flower Messages over real synthetic DICOM, and must fail closed: the refusal names the rule,
the audit log has a ``refusal`` line and no data access, and nothing is reset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from flower_messages import coded_failure, instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import create_client_app
from client.audit import AuditLog, verify_audit_log
from client.cli import site as site_cli
from client.errors import PolicyError
from client.policy import load_policy
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec
from privacy import (
    PrivacyLedger,
    compose_epsilon,
    verify_ledger,
)
from privacy.ledger import entry_hash

pytestmark = [pytest.mark.privacy, pytest.mark.adversarial]
SPEC = ModelSpec(channels=(8, 16), image_size=32)
RUN = 11


@pytest.fixture
def site_dir(synthetic_sites: list[Path], tmp_path: Path) -> Path:
    copy = tmp_path / "site"
    shutil.copytree(synthetic_sites[0], copy)
    return copy


def _message(kind: str, *, server_round: int = 1, run_id: int = RUN, **overrides) -> Message:
    settings = {"consortium": "c1", "model_name": "m1", **overrides}
    config = RoundInstructions(spec=SPEC, batch_size=8, **settings).to_config()
    config["server-round"] = server_round
    return instruction(RecordDict({"arrays": ArrayRecord(build_unet(SPEC).state_dict()),
                                   "config": ConfigRecord(config)}), kind, run_id=run_id)


def _call(site: Path, kind: str = MessageType.TRAIN, *, run_id: int = RUN, **overrides) -> Message:
    context = Context(run_id=run_id, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(site), "site-name": "h1", "cache-dir": "none"})
    return create_client_app()(_message(kind, run_id=run_id, **overrides), context)


def _dp(site: Path, **overrides) -> Message:
    return _call(site, dp=True, **{"noise_multiplier": 1.0, **overrides})


def _audit(home: Path) -> AuditLog:
    return AuditLog(home / "audit" / "h1.jsonl")


def _ledger(home: Path) -> Path:
    return home / "ledgers" / "h1.json"


def _events_since(home: Path, count: int) -> list[str]:
    return [r["event"] for r in _audit(home).records()[count:]]


def _policy(site: Path, text: str) -> None:
    (site / "policy.toml").write_text(text)


def _refusal(reply: Message, code: str, match: str | None = None) -> dict:
    """The audit log's refusal line behind the coded error ``reply`` (its reason matches ``match``)."""
    audit_file = AuditLog(Path(os.environ["FEDSEG_HOME"]) / "audit" / "h1.jsonl").path
    line = coded_failure(reply, code, audit_file)["audit"]
    assert line["event"] == "refusal", line
    if match is not None:
        assert re.search(match, line["reason"]), line["reason"]
    return line


def _assert_refused_before_data(home: Path, before: int, rule: str) -> None:
    """The refused message left a refusal naming ``rule`` and read nothing."""
    records = _audit(home).records()
    assert [r["event"] for r in records[before:]] == ["round-start", "refusal"]
    assert records[-1]["rule"] == rule
    assert verify_audit_log(_audit(home).path).ok


# ------------------------------------------------------------------ the run's names do not scope ε


def test_renaming_the_consortium_or_the_model_does_not_reset_the_spend(site_dir: Path,
                                                                       fedseg_home: Path) -> None:
    first = _dp(site_dir).content["metrics"]["epsilon"]
    renamed = _dp(site_dir, consortium="fresh-consortium", model_name="fresh-model", run_id=RUN + 1)
    second = renamed.content["metrics"]["epsilon"]
    assert second > first  # composed with the first round, not a fresh budget
    ledger = PrivacyLedger(_ledger(fedseg_home))
    entries = ledger.entries("site")
    assert [(e.consortium, e.model) for e in entries] == [("c1", "m1"), ("fresh-consortium", "fresh-model")]
    assert second == pytest.approx(compose_epsilon([e.mechanism for e in entries], delta=entries[0].delta,
                                                   accountant="rdp"))

    # a budget above what is spent but below a third round: a third name buys no fresh budget
    # (a fresh one would allow the round, since one round alone costs less than this)
    budget = second + 0.3 * (second - first)
    _policy(site_dir, f"[privacy]\nrequire_dp = true\nepsilon_budget = {budget:.6f}\n")
    refused = _refusal(_dp(site_dir, consortium="third-name", model_name="other", run_id=RUN + 2),
                       "FEDSEG-PRIVACY-001", "remaining budget")
    assert len(PrivacyLedger(_ledger(fedseg_home)).entries("site")) == 2  # nothing spent
    assert _audit(fedseg_home).records()[-1]["rule"] == "privacy.epsilon_budget"


def test_a_version_1_ledger_keeps_all_its_history_under_any_name(site_dir: Path, fedseg_home: Path) -> None:
    old = {"run_id": "old", "round": 1, "noise_multiplier": 0.8, "sample_rate": 0.25, "steps": 40,
           "delta": 1e-5, "accountant": "rdp", "time": "2026-01-01T00:00:00+00:00"}
    v1 = {"format": "fedseg-privacy-ledger", "version": 1,
          "ledgers": {"old-consortium": {"old-model": [old]},
                      "other": {"m": [{**old, "time": "2026-02-01T00:00:00+00:00"}]}}}
    _ledger(fedseg_home).parent.mkdir(parents=True)
    _ledger(fedseg_home).write_text(json.dumps(v1))
    history = compose_epsilon([(0.8, 0.25, 40)] * 2, delta=1e-5, accountant="rdp")
    assert PrivacyLedger(_ledger(fedseg_home)).spent("site") == pytest.approx(history)

    reply = _dp(site_dir, consortium="new-name")  # δ stays the migrated 1e-5
    assert reply.content["metrics"]["epsilon"] > history
    doc = json.loads(_ledger(fedseg_home).read_text())
    assert doc["version"] == 2 and len(doc["entries"]) == 3  # rewritten as version 2, nothing lost
    assert [e["consortium"] for e in doc["entries"]] == ["old-consortium", "other", "new-name"]
    assert verify_ledger(_ledger(fedseg_home)).ok


# ------------------------------------------------------------------ floors and caps of the policy


def test_noise_below_the_sites_floor_is_refused_before_any_data(site_dir: Path, fedseg_home: Path) -> None:
    _policy(site_dir, "[privacy]\nrequire_dp = true\nmin_noise_multiplier = 1.0\n")
    refused = _refusal(_dp(site_dir, noise_multiplier=0.3),
                       "FEDSEG-POLICY-001", r"\[privacy\] min_noise_multiplier")
    assert refused["rule"] == "privacy.min_noise_multiplier"
    _assert_refused_before_data(fedseg_home, 1, "privacy.min_noise_multiplier")
    assert not _ledger(fedseg_home).exists()
    assert _dp(site_dir, noise_multiplier=1.0, server_round=2).content["metrics"]["epsilon"] > 0

    # σ derived from target-epsilon is held to the same floor (once the split's size is known)
    count = len(_audit(fedseg_home).records())
    refused = _refusal(_dp(site_dir, noise_multiplier=0.0, target_epsilon=200.0, server_round=3),
                       "FEDSEG-POLICY-001", r"\[privacy\] min_noise_multiplier")
    assert _events_since(fedseg_home, count)[-1] == "refusal"
    assert len(PrivacyLedger(_ledger(fedseg_home)).entries()) == 1  # nothing trained


def test_epsilon_per_run_above_the_cap_is_refused(site_dir: Path, fedseg_home: Path) -> None:
    _policy(site_dir, "[privacy]\nrequire_dp = true\nmax_epsilon_per_run = 5.0\n")
    refused = _refusal(_dp(site_dir, noise_multiplier=0.0, target_epsilon=50.0),
                       "FEDSEG-POLICY-001", r"\[privacy\] max_epsilon_per_run")
    assert refused["rule"] == "privacy.max_epsilon_per_run"
    _assert_refused_before_data(fedseg_home, 1, "privacy.max_epsilon_per_run")

    _policy(site_dir, "[privacy]\nrequire_dp = true\n")
    first = _dp(site_dir, noise_multiplier=1.0).content["metrics"]["epsilon"]
    # the coming round would take this run above a cap between one round and two: refused
    # before training, nothing recorded (the split's size decides this round's ε)
    _policy(site_dir, f"[privacy]\nrequire_dp = true\nmax_epsilon_per_run = {first * 1.2:.6f}\n")
    refused = _refusal(_dp(site_dir, noise_multiplier=1.0, server_round=2),
                       "FEDSEG-POLICY-001", "above the .* the site allows per run")
    # a run that has spent its cap is refused before any data is read
    _policy(site_dir, f"[privacy]\nrequire_dp = true\nmax_epsilon_per_run = {first:.6f}\n")
    count = len(_audit(fedseg_home).records())
    refused = _refusal(_dp(site_dir, noise_multiplier=1.0, server_round=3),
                       "FEDSEG-POLICY-001", "this run has spent")
    _assert_refused_before_data(fedseg_home, count, "privacy.max_epsilon_per_run")
    assert len(PrivacyLedger(_ledger(fedseg_home)).entries()) == 1
    # another run starts its own per-run allowance (the total budget is epsilon_budget's job)
    _policy(site_dir, f"[privacy]\nrequire_dp = true\nmax_epsilon_per_run = {first * 1.2:.6f}\n")
    assert _dp(site_dir, noise_multiplier=1.0, run_id=RUN + 1).content["metrics"]["epsilon"] > first


def test_more_train_rounds_than_the_policy_allows_are_refused(site_dir: Path, fedseg_home: Path) -> None:
    _policy(site_dir, "[privacy]\nmax_rounds = 2\n")
    _call(site_dir, server_round=1)
    _call(site_dir, server_round=1)  # a resent round counts too: it reads and trains again
    count = len(_audit(fedseg_home).records())
    refused = _refusal(_call(site_dir, server_round=2),
                       "FEDSEG-POLICY-001", r"at most 2 train messages per run \(\[privacy\] max_rounds\)")
    _assert_refused_before_data(fedseg_home, count, "privacy.max_rounds")
    assert _call(site_dir, server_round=1, run_id=RUN + 1).content["metrics"]["num-examples"] > 0


def test_more_evaluations_than_the_policy_allows_are_refused_across_processes(site_dir: Path,
                                                                               fedseg_home: Path) -> None:
    _policy(site_dir, "[privacy]\nmax_evaluations = 2\n")
    for server_round in (1, 2):
        assert "dice" in _call(site_dir, MessageType.EVALUATE, server_round=server_round).content["metrics"]
    count = len(_audit(fedseg_home).records())
    # each message runs in a fresh ClientApp process in deployment: the count is on disk
    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_privacy_budget as t;"
        "from flwr.app import MessageType;"
        "reply = t._call(__import__('pathlib').Path(sys.argv[1]), MessageType.EVALUATE, server_round=3)\n"
        "if reply.has_error():\n    print('REFUSED', reply.error.reason); raise SystemExit(3)\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script, str(site_dir)], capture_output=True, text=True,
                           timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert fresh.returncode == 3, fresh.stderr[-2000:]
    assert "REFUSED FEDSEG-POLICY-001: refused by site policy rule [privacy] max_evaluations" in fresh.stdout
    _assert_refused_before_data(fedseg_home, count, "privacy.max_evaluations")
    assert "[privacy] max_evaluations" in _audit(fedseg_home).records()[-1]["reason"]


def test_training_without_dp_is_refused_under_require_dp(site_dir: Path, fedseg_home: Path) -> None:
    _policy(site_dir, "[privacy]\nrequire_dp = true\n")
    for overrides in ({}, {"local_norm": True}, {"proximal_mu": 0.1}):
        count = len(_audit(fedseg_home).records())
        refused = _refusal(_call(site_dir, **overrides), "FEDSEG-POLICY-001", r"\[privacy\] require_dp")
        assert refused["rule"] == "privacy.require_dp"
        _assert_refused_before_data(fedseg_home, count if count else 1, "privacy.require_dp")
    assert not _ledger(fedseg_home).exists()


def test_bad_floor_and_cap_values_are_named(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    for text, message in [("min_noise_multiplier = 0", "privacy.min_noise_multiplier must be a positive"),
                          ("max_epsilon_per_run = -1", "privacy.max_epsilon_per_run must be a positive"),
                          ("max_rounds = 0", "privacy.max_rounds must be a positive integer"),
                          ("max_evaluations = 1.5", "privacy.max_evaluations must be an integer >= 0"),
                          ('budget_scope = "a b"', "privacy.budget_scope must be")]:
        path.write_text(f"[privacy]\n{text}\n")
        with pytest.raises(PolicyError, match=message):
            load_policy(path)
    path.write_text('[privacy]\nbudget_scope = "cohort-2026"\nmax_evaluations = 0\n')
    policy = load_policy(path)
    assert policy.budget_scope == "cohort-2026" and policy.max_evaluations == 0


# ------------------------------------------------------------------ a deleted or rolled-back ledger


def _two_rounds(site: Path, home: Path) -> str:
    _dp(site)
    _dp(site, server_round=2)
    return _ledger(home).read_text()


def _rehash(entries: list[dict]) -> None:
    """What a careful attacker does after editing: recompute every hash of the chain."""
    prev = "0" * 64
    for entry in entries:
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)


def _tamper_delete(path: Path) -> None:
    path.unlink()


def _tamper_truncate(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["entries"] = doc["entries"][:1]  # still a valid chain, one round shorter
    path.write_text(json.dumps(doc))


def _tamper_edit(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["entries"][0]["steps"] = 1  # less spent
    path.write_text(json.dumps(doc))


def _tamper_edit_and_rehash(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["entries"][1]["noise_multiplier"] = 50.0
    _rehash(doc["entries"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [(_tamper_delete, "privacy ledger is missing but the audit log anchored 2 entries"),
     (_tamper_truncate, "privacy ledger holds 1 entries, fewer than the 2 the audit log anchored"),
     (_tamper_edit, "privacy ledger entry 1 of 2 does not match its hash"),
     (_tamper_edit_and_rehash, "privacy ledger entry 2 is not the one the audit log anchored")],
    ids=["deleted", "truncated", "edited", "edited-and-rehashed"],
)
def test_a_deleted_or_rolled_back_ledger_is_refused_never_reset(site_dir: Path, fedseg_home: Path,
                                                                tamper, message: str) -> None:
    _two_rounds(site_dir, fedseg_home)
    path = _ledger(fedseg_home)
    anchors = [r for r in _audit(fedseg_home).records() if r["event"] == "ledger-anchor"]
    assert [a["entries"] for a in anchors] == [1, 2]
    tamper(path)
    tampered = path.read_text() if path.exists() else None

    count = len(_audit(fedseg_home).records())
    refused = _refusal(_dp(site_dir, server_round=3), "FEDSEG-PRIVACY-004", message)
    assert str(site_dir) not in refused["reason"] and str(fedseg_home) not in refused["reason"]
    _assert_refused_before_data(fedseg_home, count, "privacy.ledger")
    assert (path.read_text() if path.exists() else None) == tampered  # left as found, not reset
    # and again: the refusal does not wear off
    refused = _refusal(_dp(site_dir, server_round=3, run_id=RUN + 1),
                       "FEDSEG-PRIVACY-004", None)

    shown = CliRunner().invoke(site_cli, ["ledger", "verify", "--site-name", "h1"])
    assert shown.exit_code == 1 and "REFUSED" in shown.output and message in shown.output
    report = json.loads(CliRunner().invoke(site_cli, ["ledger", "verify", "--site-name", "h1",
                                                      "--format", "json"]).output)
    assert report["ok"] is False and report["anchors"] == 2 and report["last_anchor"]["entries"] == 2


def test_ledger_verify_reports_a_sound_ledger_and_only_the_current_state_is_accepted(
        site_dir: Path, fedseg_home: Path) -> None:
    _dp(site_dir)
    backup = _ledger(fedseg_home).read_text()
    _dp(site_dir, server_round=2)
    current = _ledger(fedseg_home).read_text()
    shown = CliRunner().invoke(site_cli, ["ledger", "verify", "--site-name", "h1"])
    assert shown.exit_code == 0 and shown.output.startswith("OK") and "2 anchors" in shown.output

    _ledger(fedseg_home).write_text(backup)  # an older backup is a rollback: refused
    refused = _refusal(_dp(site_dir, server_round=3),
                       "FEDSEG-PRIVACY-004", "holds 1 entries, fewer than the 2")
    _ledger(fedseg_home).write_text(current)  # the current state restored: rounds go on
    reply = _dp(site_dir, server_round=3)
    assert len(PrivacyLedger(_ledger(fedseg_home)).entries()) == 3
    assert reply.content["metrics"]["epsilon"] == pytest.approx(PrivacyLedger(_ledger(fedseg_home)).spent())
