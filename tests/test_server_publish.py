"""The ServerApp's federation logic against the real ClientApp and a real sqlite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from registry import default_store, list_versions, load_model
from registry.cli import registry
from server.config import FederationConfig
from server.errors import FederationError, RunConfigError
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config

TINY = "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8"


def _config(overrides: str = TINY) -> FederationConfig:
    return FederationConfig.from_run_config(fused_run_config(default_app_dir(), overrides))


def test_federation_publishes_lineage_and_champion(synthetic_sites: list[Path], fedseg_home: Path) -> None:
    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    store = default_store()
    lines: list[str] = []
    outcome = run_federation(grid, _config(), store, progress=lines.append)

    assert store.tracking_uri == f"sqlite:///{fedseg_home.resolve() / 'mlflow.db'}"
    assert outcome.published.version == 1 and outcome.published.promoted
    assert any(line.startswith("round 2: Dice pooled") for line in lines)
    assert set(outcome.sites) == {"site-a", "site-b"}

    (row,) = list_versions(store)
    assert row["aliases"] == ["champion"]
    assert 0.0 <= row["metrics"]["dice_pooled"] <= 1.0
    assert "dice_min" in row["metrics"]
    tags = row["tags"]
    assert tags["rounds"] == "2" and tags["strategy"] == "fedavg"
    assert tags["run_id"] == outcome.run_id
    sites = json.loads(tags["sites"])
    assert sites == outcome.sites and all(n > 0 for n in sites.values())
    assert tags["code_version"]
    assert json.loads(tags["dp"]) == {"enabled": False} and tags["secure_aggregation"] == "off"
    assert set(json.loads(tags["site_manifests"])) == {"site-a", "site-b"}
    reference = json.loads(tags["input_reference"])
    inputs = json.loads(tags["site_inputs"])
    assert reference["slices"] == sum(v["slices"] for v in inputs.values())
    assert reference["intensity_p01"] <= reference["intensity_p50"] <= reference["intensity_p99"]

    # per-round, per-site metrics went to MLflow tracking
    client = store.client()
    history = client.get_metric_history(outcome.run_id, "site/site-a/evaluate/dice")
    assert [m.step for m in history] == [1, 2]
    norms = client.get_metric_history(outcome.run_id, "site/site-b/train/update-norm")
    assert [m.step for m in norms] == [1, 2] and all(m.value > 0 for m in norms)
    assert client.get_run(outcome.run_id).data.params["strategy"] == "fedavg"

    # the registered weights load back and match the spec
    loaded = load_model(store, "models:/fedseg-unet@champion")
    assert loaded.version == 1 and loaded.spec.image_size == 32

    # a second, worse model is registered but does not take the alias
    grid2 = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    outcome2 = run_federation(grid2, _config(TINY.replace("num-server-rounds=2", "num-server-rounds=1") + " learning-rate=1e-9"), store, progress=lines.append)
    assert outcome2.published.version == 2
    versions = {r["version"]: r for r in list_versions(store)}
    champion_version = 2 if outcome2.published.promoted else 1
    assert versions[champion_version]["aliases"] == ["champion"]

    result = CliRunner().invoke(registry, ["list", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [r["version"] for r in listed] == [1, 2]
    assert {"name", "version", "aliases", "metrics", "tags"} <= set(listed[0])


def test_no_replies_publishes_nothing(tmp_path: Path, fedseg_home: Path) -> None:
    empty = tmp_path / "empty-site"
    empty.mkdir()
    grid = LocalGrid(create_client_app(PartitionSites((empty, empty))), 2)
    with pytest.raises(FederationError, match=r"round 1: 0 site\(s\) answered, min-sites is 2, after 2 attempt"):
        run_federation(grid, _config(), default_store(), progress=lambda _: None)
    assert list_versions(default_store()) == []
    # the sites sent codes and counts only ("no usable labelled series: 0 labelled, ...")
    assert all(r.error.reason.startswith("FEDSEG-DATA-001: no usable labelled series: 0 labelled")
               for r in grid.replies if r.has_error())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num-server-rounds=0", "num-server-rounds must be >= 1"),
        ("strategy='fedfoo'", "unknown strategy 'fedfoo'"),
        ("image-size=30", "image_size 30 must be a positive multiple"),
        ("local-epochs=0", "local-epochs must be >= 1"),
        ("client-dp=true fraction-train=0.5", "client-dp=true needs fraction-train=1.0"),
        ("dp=true noise-multiplier=0.0", "dp=true needs noise-multiplier > 0 or target-epsilon > 0"),
        ("dp='maybe'", "expected true or false"),
    ],
)
def test_bad_run_config_is_named(override: str, message: str) -> None:
    with pytest.raises(RunConfigError, match=message):
        _config(override)


@pytest.mark.privacy
def test_client_level_dp_wraps_fedavg_and_is_in_the_lineage(synthetic_sites: list[Path]) -> None:
    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    config = _config(TINY.replace("num-server-rounds=2", "num-server-rounds=1") + " client-dp=true")
    outcome = run_federation(grid, config, default_store(), progress=lambda _: None)
    (row,) = list_versions(default_store())
    dp = json.loads(row["tags"]["dp"])
    assert dp["enabled"] is False
    assert dp["client_level"] == {"mechanism": "Flower server-side fixed clipping",
                                  "noise_multiplier": 0.1, "clipping_norm": 10.0}
    assert outcome.published.version == 1
