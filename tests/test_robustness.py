"""Misbehaving sites against the real ServerApp logic: validation rejects, the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from registry import default_store, list_versions, load_model
from server.config import FederationConfig
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config
from simulation.misbehave import misbehave_mod, parse_misbehavior

pytestmark = pytest.mark.robustness
TINY = "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8"


def _run(sites: list[Path], misbehave: list[str], overrides: str = TINY):
    plan = parse_misbehavior(misbehave, [p.name for p in sites])
    mods = [misbehave_mod(plan, sites)] if plan else None
    grid = LocalGrid(create_client_app(PartitionSites(tuple(sites)), train_mods=mods), len(sites))
    config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), overrides))
    lines: list[str] = []
    return run_federation(grid, config, default_store(), progress=lines.append), lines


def test_a_nan_site_is_rejected_and_the_model_stays_finite(synthetic_sites: list[Path]) -> None:
    outcome, lines = _run(synthetic_sites, ["site-b=nan"])
    assert sum("rejected the update of site-b: non-finite" in line for line in lines) == 2
    loaded = load_model(default_store(), f"models:/fedseg-unet/{outcome.published.version}")
    assert all(torch.isfinite(v).all() for v in loaded.state_dict.values())
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values())
    history = default_store().client().get_metric_history(outcome.run_id, "site/site-b/train/rejected")
    assert [m.step for m in history] == [1, 2]
    assert 0.0 < outcome.metrics["dice_pooled"] <= 1.0


@pytest.mark.parametrize("strategy", ["fedmedian", "fedprox", "fedadam"])
def test_other_flower_strategies_run_the_whole_path(synthetic_sites: list[Path], strategy: str) -> None:
    extra = " proximal-mu=0.01" if strategy == "fedprox" else ""
    outcome, _ = _run(synthetic_sites, [], TINY + f" strategy='{strategy}'" + extra)
    (row,) = [r for r in list_versions(default_store()) if r["version"] == outcome.published.version]
    assert row["tags"]["strategy"] == strategy
    params = json.loads(row["tags"]["strategy_params"])
    assert params["update_norm_factor"] == 10.0
    if strategy == "fedprox":
        assert params["proximal_mu"] == 0.01
    loaded = load_model(default_store(), f"models:/fedseg-unet/{outcome.published.version}")
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values())


def test_too_few_sites_stop_the_run_after_the_join_timeout(synthetic_sites: list[Path]) -> None:
    """Flower alone would wait forever below min-sites; fedseg stops with the shortfall named."""
    import time

    from server.errors import FederationError

    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), 2)
    config = FederationConfig.from_run_config(
        fused_run_config(default_app_dir(), TINY + " min-sites=3 join-timeout=1.5"))
    start = time.monotonic()
    with pytest.raises(FederationError, match="2 site\\(s\\) connected, min-sites is 3; waited 2 s"):
        run_federation(grid, config, default_store(), progress=lambda _: None)
    assert 1.5 <= time.monotonic() - start < 30
    assert grid.delivered == [] and list_versions(default_store()) == []
