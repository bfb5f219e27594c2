"""Robustness with figures: one of five hospitals misbehaves, the global model does not suffer;
one of four poisons, and the update screen refuses it (``SCREEN_SCENARIOS``).

Five 64 px synthetic hospitals, the demo's model and local training for 10 rounds, every round
through the real ServerApp logic and ClientApp (see ``robustness_scenarios.py``). Seeded, so
the figures are the same on every run on one machine; ``bench/robustness.py`` records them in
BENCHMARKS.md. Measured on a 2-core EPYC (pooled Dice of the final model): clean FedAvg 0.910;
sign-flip x5 FedAvg about 0.03, FedTrimmedAvg 0.906, FedMedian 0.855.

What "Dice unaffected" means here: a rejected update must have no influence at all, so the run
with a NaN site is compared with the run in which that site sends no update (it drops out of
every training round but still evaluates), and the published weights must be identical. The
clean five-site run is not the right reference: it also has the attacker's honest data, and
losing one site of five moves the final Dice by a few hundredths, more than
a tolerance of 0.01 would allow, for reasons unrelated to the NaN.
"""

from __future__ import annotations

import re

import pytest
import torch
from robustness_scenarios import ATTACKER, SCENARIOS, SCREEN_SCENARIOS, ScenarioResult, run_scenario, write_sites

pytestmark = [pytest.mark.robustness, pytest.mark.slow]

# The clean run must really learn, or "no degradation" would mean nothing.
MIN_CLEAN_DICE = 0.6
# Issue #6: a robust strategy under attack stays within 0.03 Dice of the clean run. The strategy is
# FedTrimmedAvg with beta 0.2: of five updates it drops the highest and the lowest per coordinate,
# which is exactly one attacker's room. (FedMedian also resists the attack but learns less per round
# from five sites: 0.855 vs 0.910 clean after 10 rounds; bench/robustness.py records it and Krum.)
ROBUST_TOLERANCE = 0.03
# FedAvg under the same attack must lose at least this much (measured: about 0.8, to Dice 0.03):
# ten times the robust tolerance, so the two outcomes cannot be confused.
FEDAVG_MIN_DROP = 0.30
# Issue 15, item 6: with four sites and the demo's 6 rounds, FedAvg behind the update screen
# under the same attack lands within this of the clean run.
SCREEN_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    """``scenario(name)`` runs a scenario of ``SCENARIOS`` once per module and caches it."""
    root = tmp_path_factory.mktemp("robustness")
    sites = write_sites(root / "sites")
    done: dict[str, ScenarioResult] = {}

    def get(name: str) -> ScenarioResult:
        if name not in done:
            done[name] = run_scenario(sites, {**SCENARIOS, **SCREEN_SCENARIOS}[name], root / "home")
        return done[name]

    return get


def _rejected_steps(result: ScenarioResult, site: str) -> list[int]:
    client = result.store.client()
    return [m.step for m in client.get_metric_history(result.run_id, f"site/{site}/train/rejected")]


def test_a_nan_site_is_rejected_every_round_and_has_no_influence(scenario) -> None:
    clean, nan, absent = scenario("clean/fedavg"), scenario("nan/fedavg"), scenario("absent/fedavg")
    rounds = len(clean.rounds)
    assert clean.metrics["dice_pooled"] > MIN_CLEAN_DICE, clean.rounds

    # rejected by validation in every round, named with its reason, and counted per site in MLflow
    assert len(nan.rejections) == rounds
    assert all(f"rejected the update of {ATTACKER}: non-finite" in line for line in nan.rejections)
    assert _rejected_steps(nan, ATTACKER) == list(range(1, rounds + 1))
    assert all(_rejected_steps(nan, s) == [] for s in ("site-a", "site-b", "site-c", "site-d"))
    assert _rejected_steps(clean, ATTACKER) == []

    # no influence: the same weights as the run in which that site sends no update at all
    nan_state, absent_state = nan.state_dict(), absent.state_dict()
    assert nan_state.keys() == absent_state.keys()
    assert all(torch.isfinite(v).all() for v in nan_state.values())
    assert all(torch.equal(nan_state[k], absent_state[k]) for k in nan_state)
    assert nan.metrics == absent.metrics
    assert nan.metrics["dice_pooled"] > MIN_CLEAN_DICE


def test_a_robust_strategy_survives_a_sign_flipping_site_that_breaks_fedavg(scenario) -> None:
    clean = scenario("clean/fedavg")
    fedavg, robust = scenario("signflip5/fedavg"), scenario("signflip5/fedtrimmedavg")
    assert clean.metrics["dice_pooled"] > MIN_CLEAN_DICE, clean.rounds

    # the flipped update is 5x an honest one: within the norm bound (10x the median), so it is
    # not rejected; whatever happens is the strategy's doing
    assert fedavg.rejections == [] and robust.rejections == []
    assert _rejected_steps(fedavg, ATTACKER) == []

    drop = clean.metrics["dice_pooled"] - fedavg.metrics["dice_pooled"]
    assert drop >= FEDAVG_MIN_DROP, fedavg.rounds
    assert abs(robust.metrics["dice_pooled"] - clean.metrics["dice_pooled"]) <= ROBUST_TOLERANCE, robust.rounds
    # the worst site too, not only the pooled figure
    assert robust.metrics["dice_min"] > clean.metrics["dice_min"] - 2 * ROBUST_TOLERANCE, robust.rounds


@pytest.mark.adversarial
def test_the_update_screen_refuses_a_poisoning_site_among_four(scenario) -> None:
    clean, absent = scenario("4sites/clean/fedavg"), scenario("4sites/absent/fedavg")
    unscreened, screened = scenario("4sites/signflip5/fedavg-unscreened"), scenario("4sites/signflip5/fedavg")
    rounds = len(clean.rounds)
    assert clean.metrics["dice_pooled"] > MIN_CLEAN_DICE, clean.rounds
    # honest non-IID sites are never refused
    assert clean.rejections == [], clean.rejections
    # the attack works without the screen ...
    assert clean.metrics["dice_pooled"] - unscreened.metrics["dice_pooled"] >= FEDAVG_MIN_DROP, unscreened.rounds
    assert unscreened.rejections == []
    # ... and with it the attacker is refused every round, by name, and counted per site
    assert len(screened.rejections) == rounds, screened.rejections
    # round 1 by direction; later, with site-d's data no longer in the model, its honest update
    # points away from the others and its flip towards them, and its size (about 5x) gives it away
    assert "round 1: rejected the update of site-d: direction: cosine -" in screened.rejections[0]
    assert all(re.search(r"rejected the update of site-d: (direction|norm-ratio): ", line)
               for line in screened.rejections), screened.rejections
    assert [step for step, _ in screened.history("site/site-d/train/rejected")] == list(range(1, rounds + 1))
    assert all(screened.history(f"site/{s}/train/rejected") == [] for s in ("site-a", "site-b", "site-c"))
    assert abs(screened.metrics["dice_pooled"] - clean.metrics["dice_pooled"]) <= SCREEN_TOLERANCE, screened.rounds
    # a refused update has no influence: the weights of the run in which site-d sends none
    x, y = screened.state_dict(), absent.state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.adversarial
def test_the_update_screen_refuses_nothing_from_three_honest_sites_and_the_attacker_of_three(scenario) -> None:
    clean, screened = scenario("3sites/clean/fedavg"), scenario("3sites/signflip5/fedavg")
    assert clean.rejections == [], clean.rejections
    assert len(screened.rejections) == len(screened.rounds)
    assert all(re.search(r"rejected the update of site-c: (direction|norm-ratio): ", line)
               for line in screened.rejections), screened.rejections
