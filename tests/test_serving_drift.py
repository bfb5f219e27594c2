"""Input drift: request statistics against the registered version's `input_reference` lineage tag."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from evidence import evaluated
from imaging.dicom_read import read_series
from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.site_stats import InputStatsBuilder
from imaging.spec import ModelSpec
from imaging.volume import Volume
from registry import TrackingRun, default_store, publish_model
from server.federation import input_reference
from serving import ServingSettings, create_app, registry_loader
from serving.drift import DriftMonitor, InputReference, InputStats, input_stats

SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
MODEL = "fedseg-unet-drift"
SPACING = (2.0, 0.8, 0.8)


def _pixels(seed: str, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    pixels = rng.integers(100, 1100, size=(2, 32, 32)).astype(np.int64)
    return (pixels * scale).astype(np.int64)


def _series(root: Path, seed: str, *, scale: float = 1.0, manufacturer: str = "Acme") -> list[Path]:
    return write_series(root / seed, _pixels(seed, scale), patient_id="P", patient_name="Test^Patient",
                        uid_seed=seed, modality="MR", spacing=SPACING, manufacturer=manufacturer)


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


@pytest.fixture(scope="module")
def fedseg_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """(Overrides the autouse fixture for this module.) A registry with version 1 (lineage from two
    training sites' real input stats) and version 2 (no input_reference)."""
    root = tmp_path_factory.mktemp("drift")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSEG_HOME", str(root / "home"))
        mp.delenv("FEDSEG_MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        inputs = {}
        for site in ("site-a", "site-b"):  # what each hospital reports (imaging.site_stats)
            builder = InputStatsBuilder()
            for i in range(3):
                builder.add(read_series(_series(root / "train", f"{site}-{i}")), has_seg=True)
            inputs[site] = builder.stats()
        lineage = {"input_reference": json.dumps(input_reference(inputs)),
                   "site_inputs": json.dumps(inputs)}
        torch.manual_seed(0)
        store = default_store()
        run = TrackingRun.start(store, "drift-tests", "publish", {})
        state = build_unet(SPEC).state_dict()
        publish_model(store, run, MODEL, state, SPEC, {"dice_pooled": 0.5}, {**lineage, **evaluated()})
        publish_model(store, run, MODEL, state, SPEC, {"dice_pooled": 0.4}, evaluated())
        run.end(ok=True)
        yield root / "home"


def _client(version: int, **drift: object) -> TestClient:
    settings = ServingSettings(model_uri=f"models:/{MODEL}/{version}", device="cpu", auth="off",
                               **drift)
    return TestClient(create_app(settings, loader=registry_loader))


def test_drift_alert_from_the_registered_reference(tmp_path: Path) -> None:
    with _client(1, drift_threshold=0.3, drift_window=4, drift_min_requests=2) as client:
        first = client.get("/v1/drift").json()
        assert first["reference_version"] == 1 and first["requests"] == 0 and not first["alert"]
        assert {s["stat"] for s in first["stats"]} == {
            "intensity_p01", "intensity_p50", "intensity_p99",
            "spacing_slice_mm", "spacing_row_mm", "spacing_col_mm", "vendor_unseen"}

        for i in range(2):  # like the training data
            r = client.post("/v1/predict", files=_files(_series(tmp_path / "in", f"in-{i}")))
            assert r.status_code == 200, r.text
        calm = client.get("/v1/drift").json()
        assert calm["requests"] == 2 and calm["alert"] is False, calm
        stats = {s["stat"]: s for s in calm["stats"]}
        assert stats["intensity_p50"]["relative_deviation"] < 0.1
        assert stats["spacing_row_mm"]["current"] == pytest.approx(0.8)
        assert stats["vendor_unseen"]["current"] == 0
        assert calm["vendors"] == {"Acme": 2}

        for i in range(4):  # brighter scanner, other vendor: fills the window
            r = client.post("/v1/predict",
                            files=_files(_series(tmp_path / "out", f"out-{i}", scale=3.0, manufacturer="Other")))
            assert r.status_code == 200, r.text
        drifted = client.get("/v1/drift").json()
        assert drifted["requests"] == 4 and drifted["alert"] is True, drifted
        over = {s["stat"] for s in drifted["stats"] if s["over_threshold"]}
        assert {"intensity_p50", "intensity_p99", "vendor_unseen"} <= over
        assert not over & {"spacing_slice_mm", "spacing_row_mm", "spacing_col_mm"}
        assert "intensity_p50" in drifted["detail"]

        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        assert families["fedseg_drift_alert"].samples[0].value == 1.0
        deviation = {s.labels["stat"]: s.value for s in families["fedseg_drift_relative_deviation"].samples}
        assert deviation["intensity_p50"] == pytest.approx(
            next(s["relative_deviation"] for s in drifted["stats"] if s["stat"] == "intensity_p50"))


def test_version_without_reference_says_so(tmp_path: Path) -> None:
    with _client(2) as client:
        r = client.post("/v1/predict", files=_files(_series(tmp_path / "in2", "in-x")))
        assert r.status_code == 200
        body = client.get("/v1/drift").json()
    assert body["reference_version"] == 2 and body["requests"] == 1
    assert body["alert"] is False and body["stats"] == []
    assert "no input_reference" in body["detail"]


def _volume(pixels: np.ndarray, spacing=(2.0, 0.8, 0.8), vendor: str = "Acme") -> Volume:
    return Volume(pixels=pixels.astype(np.float32), spacing=spacing, series_uid="1.2", study_uid="1.3",
                  sop_instance_uids=tuple(str(i) for i in range(pixels.shape[0])), manufacturer=vendor)


def test_input_stats_match_the_sites_statistics() -> None:
    pixels = np.arange(2 * 50 * 50, dtype=np.float32).reshape(2, 50, 50)
    stats = input_stats(_volume(pixels, spacing=(3.0, 0.5, 0.6), vendor=""))
    # the same sample and percentiles as a training site's imaging.site_stats
    builder = InputStatsBuilder()
    builder.add(_volume(pixels), has_seg=False)
    site = builder.stats()
    for key in ("intensity_p01", "intensity_p50", "intensity_p99"):
        assert stats.values[key] == pytest.approx(site[key], abs=1e-3)
    assert (stats.values["spacing_slice_mm"], stats.values["spacing_col_mm"]) == (3.0, 0.6)
    assert stats.vendor == "unknown"


def test_reference_from_tags() -> None:
    tags = {
        "input_reference": json.dumps({"intensity_p01": 1.0, "intensity_p50": 5.0, "intensity_p99": 9.0,
                                       "vendors": {"A": 3}}),
        "site_inputs": json.dumps({"a": {"slices": 30, "spacing_mm": [1.0, 1.0, 1.0]},
                                   "b": {"slices": 10, "spacing_mm": [5.0, 1.0, 1.0]},
                                   "c": {"slices": 10, "spacing_mm": "bad"}}),
    }
    ref = InputReference.from_tags(4, tags)
    assert ref is not None and ref.vendors == {"A": 3}
    assert ref.values["spacing_slice_mm"] == pytest.approx(2.0)  # slice-weighted
    assert InputReference.from_tags(4, {}) is None
    assert InputReference.from_tags(4, {"input_reference": "not json"}) is None


def test_window_rolls_and_alert_clears() -> None:
    monitor = DriftMonitor(window=3, threshold=0.2, min_requests=2)
    monitor.set_reference(1, InputReference(1, {"intensity_p01": 0.0, "intensity_p50": 50.0,
                                                "intensity_p99": 100.0}))
    shifted = InputStats({"intensity_p01": 0.0, "intensity_p50": 90.0, "intensity_p99": 100.0}, "A")
    normal = InputStats({"intensity_p01": 0.0, "intensity_p50": 50.0, "intensity_p99": 100.0}, "A")
    monitor.observe(shifted, 1)
    assert monitor.report().alert is False  # below min_requests
    monitor.observe(shifted, 1)
    report = monitor.report()
    assert report.alert is True
    assert next(s for s in report.stats if s.stat == "intensity_p50").relative_deviation == pytest.approx(0.4)
    for _ in range(3):
        monitor.observe(normal, 1)
    assert monitor.report().alert is False and monitor.report().requests == 3
