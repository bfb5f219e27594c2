"""One federation end to end through Flower's simulation engine (Ray) into the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_simulated_federation_registers_a_champion(synthetic_sites: list[Path], fedseg_home: Path) -> None:
    sites_dir = synthetic_sites[0].parent
    env_cmd = [sys.executable, "-m", "fedseg.cli"]
    run = subprocess.run(
        [*env_cmd, "simulate", "run", "--sites-dir", str(sites_dir), "--run-config",
         "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8 model-name='e2e-unet'"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "round 2: Dice pooled" in run.stderr
    assert "published e2e-unet v1 (champion" in run.stderr

    listed = subprocess.run([*env_cmd, "registry", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    (version,) = json.loads(listed.stdout)
    assert version["name"] == "e2e-unet" and version["aliases"] == ["champion"]
    assert json.loads(version["tags"]["sites"]).keys() == {p.name for p in synthetic_sites}
    assert version["tags"]["rounds_completed"] == "2"


def test_simulate_run_refuses_bad_input_clearly(tmp_path: Path, fedseg_home: Path) -> None:
    from click.testing import CliRunner

    from simulation.cli import simulate

    runner = CliRunner()
    missing = runner.invoke(simulate, ["run", "--sites-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    (tmp_path / "one-site").mkdir()
    (tmp_path / "one-site" / "site-a").mkdir()
    too_few = runner.invoke(simulate, ["run", "--sites-dir", str(tmp_path / "one-site")])
    assert too_few.exit_code != 0 and "min-sites=2" in too_few.output
    unknown = runner.invoke(simulate, ["run", "--sites-dir", str(tmp_path / "one-site"),
                                       "--run-config", "num-rounds=3"])
    assert unknown.exit_code != 0 and "unknown run config key(s) ['num-rounds']" in unknown.output
