"""Shared fixtures: an isolated $FEDSEG_HOME, small synthetic hospitals, a real Orthanc (`orthanc`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from orthanc import orthanc  # noqa: F401  (fixture: a real Orthanc PACS, see tests/orthanc.py)

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# services started by tests (in process or as processes) serve eagerly: compiling costs seconds
# per model; tests/test_serving_compiled.py turns it on
os.environ.setdefault("FEDSEG_SERVE_COMPILE", "false")


@pytest.fixture(autouse=True)
def fedseg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own $FEDSEG_HOME: nothing is written to the user's ~/.fedseg."""
    home = tmp_path / "fedseg-home"
    monkeypatch.setenv("FEDSEG_HOME", str(home))
    monkeypatch.delenv("FEDSEG_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FEDSEG_ENROLMENT_DIR", raising=False)  # enrolled sites: under $FEDSEG_HOME
    monkeypatch.delenv("FEDSEG_REQUIRE_ENROLMENT", raising=False)
    return home


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small synthetic hospitals written as real DICOM (series + SEG), shared read-only."""
    from simulation.synthetic import write_synthetic_sites

    out = tmp_path_factory.mktemp("sites")
    return write_synthetic_sites(out, sites=2, patients_per_site=4, slices=8, size=32, seed=7)
