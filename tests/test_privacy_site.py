"""DP-SGD at the site through the real ClientApp: policy, ledger, budget refusal, and in a
real simulation through Flower's engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from flower_messages import coded_failure, instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from client.app import create_client_app
from client.cli import site as site_cli
from client.errors import PolicyError
from client.policy import load_policy
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec
from privacy import PrivacyLedger

pytestmark = pytest.mark.privacy
SPEC = ModelSpec(channels=(8, 16), image_size=32)


@pytest.fixture
def site_dir(synthetic_sites: list[Path], tmp_path: Path) -> Path:
    copy = tmp_path / synthetic_sites[0].name
    shutil.copytree(synthetic_sites[0], copy)
    return copy


def _train(site: Path, *, server_round: int = 1, **overrides):
    config = RoundInstructions(spec=SPEC, batch_size=8, consortium="c1", model_name="m1", **overrides).to_config()
    config["server-round"] = server_round
    message = instruction(RecordDict({"arrays": ArrayRecord(build_unet(SPEC).state_dict()),
                                      "config": ConfigRecord(config)}), MessageType.TRAIN)
    context = Context(run_id=7, node_id=1, node_config={"data-dir": str(site), "site-name": "h1"},
                      state=RecordDict(), run_config={})
    return create_client_app()(message, context)


def test_dp_round_reports_epsilon_and_records_the_ledger(site_dir: Path, fedseg_home: Path) -> None:
    reply = _train(site_dir, dp=True, noise_multiplier=1.0)
    metrics = reply.content["metrics"]
    ledger = PrivacyLedger(fedseg_home / "ledgers" / "h1.json")
    (entry,) = ledger.entries("site")  # the site's scope: what the run calls itself is kept, not keyed
    assert entry.steps == metrics["train-steps"] and entry.noise_multiplier == 1.0
    assert (entry.consortium, entry.model) == ("c1", "m1")
    assert metrics["epsilon"] == pytest.approx(ledger.spent("site"))
    assert metrics["dp-delta"] < 1 / metrics["num-examples"]
    # the second round composes with the first: ε grows, δ stays
    reply2 = _train(site_dir, server_round=2, dp=True, noise_multiplier=1.0)
    assert reply2.content["metrics"]["epsilon"] > metrics["epsilon"]
    assert len(ledger.entries("site")) == 2

    shown = CliRunner().invoke(site_cli, ["ledger", "show", "--site-name", "h1", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)["summary"]["site"]
    assert summary["entries"] == 2 and summary["epsilon"] == pytest.approx(reply2.content["metrics"]["epsilon"])


def test_over_budget_round_is_refused_naming_the_remaining_budget(site_dir: Path, fedseg_home: Path) -> None:
    first = _train(site_dir, dp=True, noise_multiplier=1.0).content["metrics"]["epsilon"]
    (site_dir / "policy.toml").write_text(f"[privacy]\nrequire_dp = true\nepsilon_budget = {first * 1.2:.6f}\n")
    refused = coded_failure(_train(site_dir, server_round=2, dp=True, noise_multiplier=1.0), "FEDSEG-PRIVACY-001",
                            fedseg_home / "audit" / "h1.jsonl")
    assert refused["rule"] == "[privacy] epsilon_budget" and refused["budget"] == pytest.approx(first * 1.2, rel=1e-3)
    assert refused["projected"] > refused["budget"] and "remaining budget" in refused["audit"]["reason"]
    assert len(PrivacyLedger(fedseg_home / "ledgers" / "h1.json").entries("site")) == 1  # nothing spent


def test_policy_rules_are_enforced_and_named(site_dir: Path, tmp_path: Path, fedseg_home: Path) -> None:
    (site_dir / "policy.toml").write_text("[privacy]\nrequire_dp = true\n[training]\nmax_local_epochs = 1\n")
    audit = fedseg_home / "audit" / "h1.jsonl"
    refused = coded_failure(_train(site_dir), "FEDSEG-POLICY-001", audit)
    assert refused["rule"] == "[privacy] require_dp" and "requires DP" in refused["audit"]["reason"]
    refused = coded_failure(_train(site_dir, dp=True, noise_multiplier=1.0, local_epochs=2), "FEDSEG-POLICY-001", audit)
    assert refused["rule"] == "[training] max_local_epochs"
    assert "at most 1 local epochs" in refused["audit"]["reason"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\nepsilon_budjet = 3\n")
    with pytest.raises(PolicyError, match="unknown key"):
        load_policy(bad)


@pytest.mark.slow
def test_simulation_refuses_an_over_budget_site_and_goes_on(synthetic_sites: list[Path], tmp_path: Path,
                                                           fedseg_home: Path) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(synthetic_sites[0].parent, sites)
    # one DP round of this site costs more than this budget allows for two
    (sites / "site-b" / "policy.toml").write_text("[privacy]\nrequire_dp = true\nepsilon_budget = 12.0\n")
    run = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "simulate", "run", "--sites-dir", str(sites), "--run-config",
         "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8 dp=true noise-multiplier=0.7 "
         "model-name='dp-unet' consortium='c-test' min-sites=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "BudgetExceededError" in run.stderr and "remaining budget" in run.stderr
    ledger_b = PrivacyLedger(fedseg_home / "ledgers" / "site-b.json")
    ledger_a = PrivacyLedger(fedseg_home / "ledgers" / "site-a.json")
    assert len(ledger_b.entries("site")) == 1
    assert len(ledger_a.entries("site")) == 2
    assert ledger_b.spent("site") <= 12.0

    listed = subprocess.run([sys.executable, "-m", "fedseg.cli", "registry", "show", "dp-unet", "1",
                             "--format", "json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lineage = json.loads(listed.stdout)["lineage"]
    assert lineage["dp"]["enabled"] is True and lineage["dp"]["noise_multiplier"] == 0.7
    assert set(lineage["dp"]["delta_sites"]) == {"site-a", "site-b"} and lineage["dp"]["delta"] <= 1e-5
    assert set(lineage["epsilon_sites"]) == {"site-a", "site-b"}
    assert lineage["epsilon_sites"]["site-a"] == pytest.approx(ledger_a.spent("site"), abs=1e-3)
