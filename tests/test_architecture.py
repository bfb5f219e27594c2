"""The import rules of DESIGN.md, checked by import-linter on every test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout, result.stdout


def test_run_config_defaults_parse() -> None:
    """The app's own [tool.flwr.app.config] is valid for the ServerApp's parser."""
    from server.config import FederationConfig
    from simulation.engine import default_app_dir, fused_run_config

    config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), None))
    assert config.strategy.name == "fedavg"
    assert config.num_rounds >= 1
