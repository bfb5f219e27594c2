"""Crash-consistent coordinator: a run killed after round k continues to n, no round twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from registry import default_store, list_versions, load_model
from server.cli import coordinator, toml_overrides
from server.config import FederationConfig
from server.errors import FederationError, JournalError
from server.federation import run_federation
from server.journal import RunJournal, list_runs
from simulation.engine import default_app_dir, fused_run_config

pytestmark = pytest.mark.robustness
TINY = "num-server-rounds=3 image-size=32 unet-channels='8,16' batch-size=8"


class _Crash(RuntimeError):
    pass


def _config(overrides: str) -> FederationConfig:
    return FederationConfig.from_run_config(fused_run_config(default_app_dir(), overrides))


def _grid(sites: list[Path]) -> LocalGrid:
    return LocalGrid(create_client_app(PartitionSites(tuple(sites))), len(sites))


def _crash_at(round_line: str):  # noqa: ANN202
    def progress(line: str) -> None:
        if line.startswith(round_line):
            raise _Crash(f"coordinator killed during {line.split(':')[0]}")
    return progress


def _weights(version: int) -> dict[str, torch.Tensor]:
    return load_model(default_store(), f"models:/fedseg-unet/{version}").state_dict


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_run_killed_in_round_3_resumes_to_the_same_model(synthetic_sites: list[Path], strategy: str) -> None:
    """Resumed after round 2 of 3, the model equals the uninterrupted run's, bit for bit."""
    overrides = TINY + f" strategy='{strategy}'"
    clean = run_federation(_grid(synthetic_sites), _config(overrides), default_store(), progress=lambda _: None)

    with pytest.raises(_Crash):
        run_federation(_grid(synthetic_sites), _config(overrides), default_store(),
                       progress=_crash_at("round 3: Dice"))
    (crashed,) = [r for r in list_runs() if r["status"] == "failed"]
    assert crashed["last_completed_round"] == 2 and crashed["rounds_completed"] == [1, 2]
    assert "coordinator killed during round 3" in crashed["error"]

    lines: list[str] = []
    resumed = run_federation(_grid(synthetic_sites), _config(overrides + f" resume-run='{crashed['run_id']}'"),
                             default_store(), progress=lines.append)
    assert resumed.run_id == crashed["run_id"] and resumed.resumed_after == 2
    assert resumed.rounds_completed == (1, 2, 3)
    # said before any round (the site-identity line may come first)
    resuming = lines.index(f"resuming run {crashed['run_id']} after round 2 of 3")
    assert not any(line.startswith("round ") for line in lines[:resuming])
    assert not any(line.startswith(("round 1:", "round 2:")) for line in lines)  # no round twice

    a, b = _weights(clean.published.version), _weights(resumed.published.version)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == pytest.approx(clean.metrics)
    journal = RunJournal.open(resumed.run_id)
    assert journal.summary()["status"] == "completed"
    assert journal.summary()["published_version"] == resumed.published.version
    (row,) = [r for r in list_versions(default_store()) if r["version"] == resumed.published.version]
    assert row["tags"]["resumed_after_round"] == "2" and row["tags"]["rounds_completed"] == "3"
    # the MLflow run holds each round's evaluation once
    history = default_store().client().get_metric_history(resumed.run_id, "eval/dice_pooled")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_resume_refuses_a_completed_run_and_another_config(synthetic_sites: list[Path]) -> None:
    overrides = "num-server-rounds=1 image-size=32 unet-channels='8,16' batch-size=8"
    done = run_federation(_grid(synthetic_sites), _config(overrides), default_store(), progress=lambda _: None)
    with pytest.raises(JournalError, match="is completed"):
        run_federation(_grid(synthetic_sites), _config(overrides + f" resume-run='{done.run_id}'"),
                       default_store(), progress=lambda _: None)
    with pytest.raises(JournalError, match="no journal for run 'nope'"):
        run_federation(_grid(synthetic_sites), _config(overrides + " resume-run='nope'"),
                       default_store(), progress=lambda _: None)
    # a failed run resumed with another learning rate is refused, naming the key
    with pytest.raises(_Crash):
        run_federation(_grid(synthetic_sites), _config(TINY), default_store(), progress=_crash_at("round 1: Dice"))
    failed = next(r for r in list_runs() if r["status"] == "failed")
    with pytest.raises(JournalError, match=r"learning-rate \(0.01 -> 0.5\)"):
        run_federation(_grid(synthetic_sites),
                       _config(TINY + f" learning-rate=0.5 resume-run='{failed['run_id']}'"),
                       default_store(), progress=lambda _: None)


def test_a_damaged_checkpoint_is_named_not_loaded(synthetic_sites: list[Path]) -> None:
    with pytest.raises(_Crash):
        run_federation(_grid(synthetic_sites), _config(TINY), default_store(), progress=_crash_at("round 2: Dice"))
    (failed,) = list_runs()
    journal = RunJournal.open(failed["run_id"])
    (journal.folder / journal.data["checkpoint"]).write_bytes(b"torn")
    with pytest.raises(JournalError, match="round-0001.pt of run .* is unreadable"):
        journal.latest()


def test_coordinator_runs_lists_status_rounds_and_metrics(synthetic_sites: list[Path]) -> None:
    overrides = "num-server-rounds=1 image-size=32 unet-channels='8,16' batch-size=8"
    done = run_federation(_grid(synthetic_sites), _config(overrides), default_store(), progress=lambda _: None)
    result = CliRunner().invoke(coordinator, ["runs", "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["run_id"] == done.run_id and row["status"] == "completed"
    assert row["last_completed_round"] == 1 and row["rounds_completed"] == [1]
    assert row["metrics"]["dice_mean"] == pytest.approx(done.metrics["dice_mean"])
    assert "dice_min" in row["metrics"]
    table = CliRunner().invoke(coordinator, ["runs"])
    assert done.run_id in table.output and "completed" in table.output
    missing = CliRunner().invoke(coordinator, ["resume", "nope"])
    assert missing.exit_code != 0 and "no journal for run 'nope'" in missing.output


def test_toml_overrides_round_trip() -> None:
    import tomllib

    config = {"a": 1, "b": 0.5, "c": True, "d": "x \"quoted\" \\ path", "resume-run": "r1"}
    assert tomllib.loads(toml_overrides(config)) == config


def _journal_of_only_run(home: Path) -> dict:
    paths = list((home / "journal").glob("*/journal.json"))
    return json.loads(paths[0].read_text()) if len(paths) == 1 else {}


@pytest.mark.slow
def test_simulated_coordinator_killed_after_round_1_resumes_to_the_end(
    synthetic_sites: list[Path], fedseg_home: Path
) -> None:
    """Real processes: `fedseg simulate run` SIGKILLed after round 1 of 3, then `--resume`."""
    sites_dir = synthetic_sites[0].parent
    env = {**os.environ, "FEDSEG_HOME": str(fedseg_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    fedseg = [sys.executable, "-m", "fedseg.cli"]
    run = subprocess.Popen([*fedseg, "simulate", "run", "--sites-dir", str(sites_dir), "--run-config", TINY],
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while _journal_of_only_run(fedseg_home).get("last_completed_round", 0) < 1:
            assert run.poll() is None, run.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.2)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    runs = json.loads(subprocess.run([*fedseg, "coordinator", "runs", "--format", "json"], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    (killed,) = runs
    assert killed["status"] == "interrupted" and killed["last_completed_round"] in (1, 2)
    after = killed["last_completed_round"]

    resumed = subprocess.run([*fedseg, "simulate", "run", "--sites-dir", str(sites_dir), "--resume", killed["run_id"]],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {killed['run_id']} after round {after} of 3" in resumed.stderr
    (row,) = json.loads(subprocess.run([*fedseg, "coordinator", "runs", "--format", "json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert row["status"] == "completed" and row["rounds_completed"] == [1, 2, 3]
    assert row["resumes"][0]["after_round"] == after and row["published_version"] == 1


def _flaky_once(fail_site: str):  # noqa: ANN202
    """A Flower mod: ``fail_site``'s first train message fails (a site lost mid-round)."""
    calls: list[int] = []

    def mod(message, context, call_next):  # noqa: ANN001,ANN202
        if int(context.node_config["partition-id"]) == int(fail_site) and not calls:
            calls.append(1)
            raise ConnectionError("site lost mid-round")
        return call_next(message, context)
    return mod


def test_a_round_below_min_sites_is_retried(synthetic_sites: list[Path]) -> None:
    app = create_client_app(PartitionSites(tuple(synthetic_sites)), train_mods=[_flaky_once("1")])
    grid = LocalGrid(app, len(synthetic_sites))
    outcome = run_federation(grid, _config("num-server-rounds=1 image-size=32 unet-channels='8,16' batch-size=8"),
                             default_store(), progress=lambda _: None)
    assert set(outcome.sites) == {"site-a", "site-b"}  # both updates made it, on the second attempt
    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert len(train) == 4  # 2 sites x 2 attempts


def test_a_round_below_min_sites_stops_after_its_retries(synthetic_sites: list[Path]) -> None:
    from simulation.misbehave import misbehave_mod, parse_misbehavior

    plan = parse_misbehavior(["site-b=dropout"], [p.name for p in synthetic_sites])
    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites)),
                                       train_mods=[misbehave_mod(plan, synthetic_sites)]), len(synthetic_sites))
    # the dropout raised inside the site's ClientApp: what reached the coordinator is its code
    with pytest.raises(FederationError, match=r"round 1: 1 site\(s\) answered, min-sites is 2, after 3 "
                                              r"attempt\(s\) \(round-retries=2\); errors: FEDSEG-INTERNAL: "):
        run_federation(grid, _config(TINY + " round-retries=2"), default_store(), progress=lambda _: None)
    assert list_versions(default_store()) == []
    assert list_runs()[0]["status"] == "failed"
