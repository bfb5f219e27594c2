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
from server.errors import FederationError
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config
from simulation.misbehave import misbehave_mod, parse_misbehavior
from simulation.synthetic import write_synthetic_sites

__all__ = [
    "SITES",
    "RUN_CONFIG",
    "ATTACKER",
    "SMALL_RUN_CONFIG",
    "Scenario",
    "ScenarioResult",
    "SCENARIOS",
    "SCREEN_SCENARIOS",
    "LGG_SCREEN_SCENARIOS",
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
# The demo's run config itself (simulation/demo.py: 6 rounds) for the small consortia of the
# update screen's scenarios: the first 2, 3 or 4 of the five hospitals, the last one attacking.
SMALL_RUN_CONFIG = (
    "num-server-rounds=6 local-epochs=2 batch-size=8 learning-rate=0.01 "
    "image-size=64 unet-channels='8,16,32' seed=42 fraction-train=1.0"
)
_NO_SCREEN = "screen-updates=false"


@dataclass(frozen=True)
class Scenario:
    """One run: the strategy, and what the misbehaving site does (``--misbehave`` specs).

    ``sites``: the first that many of the five hospitals take part."""

    name: str
    strategy: str
    misbehave: tuple[str, ...] = ()
    extra_config: str = ""
    # 4 of 5: a round in which the attacker fails (``dropout``) still counts, not retried
    min_sites: int = 4
    sites: int = 5
    base_config: str = RUN_CONFIG

    def run_config(self) -> str:
        return (f"{self.base_config} min-sites={self.min_sites} strategy='{self.strategy}' "
                f"{self.extra_config}").strip()


@dataclass
class ScenarioResult:
    scenario: Scenario
    run_id: str
    version: int | None  # None: the run published nothing (``error`` says why)
    metrics: dict[str, float]  # the final round's evaluation summary (dice_pooled, dice_mean, ...)
    rounds: list[str]  # the per-round progress lines ("round k: Dice pooled ...")
    rejections: list[str]  # the "rejected the update of ..." progress lines
    seconds: float
    store: RegistryStore = field(repr=False)
    home: Path = field(repr=False)
    error: str | None = None  # the FederationError that stopped the run, if one did
    sites: tuple[str, ...] = ()  # the site names that took part

    def history(self, metric: str) -> list[tuple[int, float]]:
        """``(round, value)`` of an MLflow metric of the run, e.g. ``site/site-a/train/rejected``."""
        client = self.store.client()
        return [(m.step, m.value) for m in client.get_metric_history(self.run_id, metric)]

    def state_dict(self) -> dict:
        """The published weights, verified against the signing key of the scenario's home."""
        with _env(self.home):
            return load_model(self.store, f"models:/fedseg-unet/{self.version}").state_dict


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("clean/fedavg", "fedavg", (), _NO_SCREEN),
        Scenario("nan/fedavg", "fedavg", (f"{ATTACKER}=nan",), _NO_SCREEN),
        # the fair reference for the NaN site: the same five sites, the attacker's update absent
        # (it fails mid-round, so its evaluation still counts)
        Scenario("absent/fedavg", "fedavg", (f"{ATTACKER}=dropout",), _NO_SCREEN),
        Scenario("signflip5/fedavg", "fedavg", (f"{ATTACKER}=signflip:5",), _NO_SCREEN),
        Scenario("signflip5/fedmedian", "fedmedian", (f"{ATTACKER}=signflip:5",),
                 f"num-malicious=1 {_NO_SCREEN}"),
        # recorded by bench/robustness.py only
        Scenario("clean/fedmedian", "fedmedian", (), f"num-malicious=1 {_NO_SCREEN}"),
        Scenario("signflip5/fedtrimmedavg", "fedtrimmedavg", (f"{ATTACKER}=signflip:5",),
                 f"num-malicious=1 trim-beta=0.2 {_NO_SCREEN}", min_sites=5),
        # Krum with f=1 needs min-sites >= 2f+3 = 5
        Scenario("signflip5/krum", "krum", (f"{ATTACKER}=signflip:5",),
                 f"num-malicious=1 {_NO_SCREEN}", min_sites=5),
    )
}


def _small(n: int, name: str, strategy: str, kind: str | None, extra: str = "", *,
           prefix: str = "", attacker: str = "") -> Scenario:
    """``n`` hospitals (site-a, ...), the last one misbehaving as ``kind``, the demo's config."""
    attacker = attacker or f"site-{'abcde'[n - 1]}"
    misbehave = (f"{attacker}={kind}",) if kind else ()
    return Scenario(f"{prefix or f'{n}sites'}/{name}", strategy, misbehave, extra, min_sites=max(2, n - 1),
                    sites=n, base_config=SMALL_RUN_CONFIG)


# bench/robustness.py --suite screen, and tests/test_update_screen.py: the update screen (on by
# default, ``screen-updates``) where consortia are small.
SCREEN_SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _small(4, "clean/fedavg", "fedavg", None),
        _small(4, "signflip5/fedavg-unscreened", "fedavg", "signflip:5", _NO_SCREEN),
        _small(4, "signflip5/fedavg", "fedavg", "signflip:5"),
        _small(4, "signflip5/fedmedian-unscreened", "fedmedian", "signflip:5", f"num-malicious=1 {_NO_SCREEN}"),
        # the fair reference for a refused attacker: its update absent, its evaluation counted
        _small(4, "absent/fedavg", "fedavg", "dropout"),
        _small(4, "scale5/fedavg", "fedavg", "scale:5"),
        _small(3, "clean/fedavg", "fedavg", None),
        _small(3, "signflip5/fedavg", "fedavg", "signflip:5"),
        _small(3, "absent/fedavg", "fedavg", "dropout"),
        _small(2, "clean/fedavg", "fedavg", None),
        _small(2, "signflip5/fedavg", "fedavg", "signflip:5"),
    )
}
# The four LGG hospitals (real non-IID sites, 276 to 1390 training slices: simulation.lgg),
# clean, behind the screen: the false-positive check on real data (bench/robustness.py --suite
# screen-lgg; about 8 minutes a round on a loaded 2-core machine, so the clean run only).
LGG_SCREEN_SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (_small(4, "clean/fedavg", "fedavg", None, prefix="lgg4"),)
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
        sites = sites[: scenario.sites]
        plan = parse_misbehavior(list(scenario.misbehave), [p.name for p in sites])
        mods = [misbehave_mod(plan, sites)] if plan else None
        grid = LocalGrid(create_client_app(PartitionSites(tuple(sites)), train_mods=mods), len(sites))
        config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), scenario.run_config()))
        store = RegistryStore.embedded(home)
        lines: list[str] = []
        start = time.monotonic()
        try:
            outcome, error = run_federation(grid, config, store, progress=lines.append), None
        except FederationError as exc:  # e.g. every round refused: nothing to publish
            outcome, error = None, str(exc)
        seconds = time.monotonic() - start
    run_id = outcome.run_id if outcome else next(
        line.split()[2].rstrip(":") for line in lines if line.startswith("federated run "))
    return ScenarioResult(
        scenario=scenario,
        run_id=run_id,
        version=outcome.published.version if outcome else None,
        error=error,
        sites=tuple(p.name for p in sites),
        metrics=dict(outcome.metrics) if outcome else {},
        rounds=[line for line in lines if "Dice pooled" in line],
        rejections=[line for line in lines if "rejected the update of" in line],
        seconds=seconds,
        store=store,
        home=home,
    )
