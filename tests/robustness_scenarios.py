"""Five synthetic hospitals, one of them misbehaving: the scenarios behind the robustness figures.

Shared by ``tests/test_robustness_figures.py`` (which asserts on them) and
``bench/robustness.py`` (which records them in BENCHMARKS.md), so both report the same runs.

Each scenario is one federated run of the real ServerApp logic (:func:`server.federation.run_federation`:
validation, quorum, Flower's strategy, MLflow tracking, registry) against the real ClientApp, with
the rounds delivered in-process by :class:`local_grid.LocalGrid` instead of a SuperLink or Ray,
and the misbehaviour injected by the same Flower mod ``fedseg simulate run --misbehave`` uses.
The data, the initial model, every site's training and the aggregation order are seeded, so a
scenario gives the same weights on every run on one machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from local_grid import LocalGrid

from client.app import create_client_app
from client.site import PartitionSites
from registry import RegistryStore, load_model
from server.config import FederationConfig
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config
from simulation.misbehave import misbehave_mod, parse_misbehavior
from simulation.synthetic import write_synthetic_sites

__all__ = [
    "SITES",
    "RUN_CONFIG",
    "ATTACKER",
    "Scenario",
    "ScenarioResult",
    "SCENARIOS",
    "write_sites",
    "run_scenario",
]

# The 64 px demo hospitals (simulation/demo.py: 8 patients x 16 slices at 64 px), five of them.
SITES = {"sites": 5, "patients_per_site": 8, "slices": 16, "size": 64, "seed": 1}
# The demo's model and local training (2 local epochs, 8,16,32 U-Net at 64 px) for 10 rounds, so
# that the runs are compared where learning levels off (at 6 rounds the curves still climb and the
# final Dice moves by several hundredths between CPUs); all five sites are asked every round, and a
# round needs at least ``Scenario.min_sites`` answers.
RUN_CONFIG = (
    "num-server-rounds=10 local-epochs=2 batch-size=8 learning-rate=0.01 "
    "image-size=64 unet-channels='8,16,32' seed=42 fraction-train=1.0"
)
ATTACKER = "site-e"


@dataclass(frozen=True)
class Scenario:
    """One run: the strategy, and what the misbehaving site does (``--misbehave`` specs)."""

    name: str
    strategy: str
    misbehave: tuple[str, ...] = ()
    extra_config: str = ""
    # 4 of 5: a round in which the attacker fails (``dropout``) still counts, not retried
    min_sites: int = 4

    def run_config(self) -> str:
        return (f"{RUN_CONFIG} min-sites={self.min_sites} strategy='{self.strategy}' "
                f"{self.extra_config}").strip()


@dataclass
class ScenarioResult:
    scenario: Scenario
    run_id: str
    version: int
    metrics: dict[str, float]  # the final round's evaluation summary (dice_pooled, dice_mean, ...)
    rounds: list[str]  # the per-round progress lines ("round k: Dice pooled ...")
    rejections: list[str]  # the "rejected the update of ..." progress lines
    seconds: float
    store: RegistryStore = field(repr=False)
    home: Path = field(repr=False)

    def state_dict(self) -> dict:
        """The published weights, verified against the signing key of the scenario's home."""
        with _env(self.home):
            return load_model(self.store, f"models:/fedseg-unet/{self.version}").state_dict


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("clean/fedavg", "fedavg"),
        Scenario("nan/fedavg", "fedavg", (f"{ATTACKER}=nan",)),
        # the fair reference for the NaN site: the same five sites, the attacker's update absent
        # (it fails mid-round, so its evaluation still counts)
        Scenario("absent/fedavg", "fedavg", (f"{ATTACKER}=dropout",)),
        Scenario("signflip5/fedavg", "fedavg", (f"{ATTACKER}=signflip:5",)),
        Scenario("signflip5/fedmedian", "fedmedian", (f"{ATTACKER}=signflip:5",), "num-malicious=1"),
        # recorded by bench/robustness.py only
        Scenario("clean/fedmedian", "fedmedian", (), "num-malicious=1"),
        Scenario("signflip5/fedtrimmedavg", "fedtrimmedavg", (f"{ATTACKER}=signflip:5",),
                 "num-malicious=1 trim-beta=0.2", min_sites=5),
        # Krum with f=1 needs min-sites >= 2f+3 = 5
        Scenario("signflip5/krum", "krum", (f"{ATTACKER}=signflip:5",), "num-malicious=1", min_sites=5),
    )
}


def write_sites(out: Path) -> list[Path]:
    """The five synthetic hospitals of :data:`SITES` as DICOM under ``out``."""
    return write_synthetic_sites(out, **SITES)


@contextmanager
def _env(home: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("FEDSEG_HOME", "FEDSEG_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    os.environ["FEDSEG_HOME"] = str(home)
    os.environ.pop("FEDSEG_MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower prints every round's records at INFO
    try:
        yield
    finally:
        flwr_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_scenario(sites: list[Path], scenario: Scenario, home: Path) -> ScenarioResult:
    """Run ``scenario`` over ``sites`` with ``$FEDSEG_HOME=home`` (registry, site caches)."""
    with _env(home):
        plan = parse_misbehavior(list(scenario.misbehave), [p.name for p in sites])
        mods = [misbehave_mod(plan, sites)] if plan else None
        grid = LocalGrid(create_client_app(PartitionSites(tuple(sites)), train_mods=mods), len(sites))
        config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), scenario.run_config()))
        store = RegistryStore.embedded(home)
        lines: list[str] = []
        start = time.monotonic()
        outcome = run_federation(grid, config, store, progress=lines.append)
        seconds = time.monotonic() - start
    return ScenarioResult(
        scenario=scenario,
        run_id=outcome.run_id,
        version=outcome.published.version,
        metrics=dict(outcome.metrics),
        rounds=[line for line in lines if "Dice pooled" in line],
        rejections=[line for line in lines if "rejected the update of" in line],
        seconds=seconds,
        store=store,
        home=home,
    )
