"""The update screen: a poisoning site is refused by direction or size, honest non-IID sites pass.

Real Flower Messages with crafted updates go through the chain the ServerApp builds
(``ValidatingStrategy(ScreeningStrategy(...FedAvg))``, see ``server/federation.py``). The
attacker sends 5x its sign-flipped update, which today's norm bound (10x the median) lets
through: the screen must refuse it, name the site and the rule, and leave the aggregate exactly
the honest sites' FedAvg.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from local_grid import LocalGrid

from aggregation import ScreeningStrategy, ScreenSettings, StrategyConfigError, ValidatingStrategy
from aggregation.screening import score_updates
from server.config import FederationConfig
from server.errors import RunConfigError
from simulation.engine import default_app_dir, fused_run_config

pytestmark = [pytest.mark.adversarial, pytest.mark.robustness]

SHAPES = {"enc.weight": (16, 8, 3, 3), "enc.bias": (16,), "dec.weight": (8, 16, 3, 3), "dec.bias": (8,)}
SITES = ("site-a", "site-b", "site-c", "site-d")


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _honest_updates(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Non-IID sites: a shared direction plus a site-specific one as large, unequal sizes
    (0.6x to 1.8x), so pairwise cosines are about 0.5 (what the synthetic runs measure)."""
    rng = np.random.default_rng(seed)
    shared = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    sizes = np.linspace(0.6, 1.8, n)
    return [{k: 0.01 * sizes[i] * (shared[k] + rng.normal(size=s)) for k, s in SHAPES.items()}
            for i in range(n)]


class Recording(FedAvg):
    """Flower's FedAvg, remembering what it was asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(min_train_nodes=2, min_available_nodes=2)
        self.seen: list[list[Message]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        replies = list(replies)
        self.seen.append(replies)
        return super().aggregate_train(server_round, replies)


class Chain:
    """The ServerApp's validation and screen around a recording FedAvg, one round at a time."""

    def __init__(self, settings: ScreenSettings | None = None, *, all_or_nothing: bool = False,
                 ignore_keys: frozenset[str] = frozenset()) -> None:
        self.inner = Recording()
        self.rejected: list[tuple[int, str, str]] = []
        self.scores: list = []
        on_reject = lambda r, s, m: self.rejected.append((r, s, m))  # noqa: E731
        self.screen = ScreeningStrategy(self.inner, settings, on_reject,
                                        lambda r, s: self.scores.extend(s), all_or_nothing=all_or_nothing,
                                        ignore_keys=ignore_keys)
        self.strategy = ValidatingStrategy(self.screen, on_reject=on_reject, all_or_nothing=all_or_nothing)

    def round(self, updates: list[dict[str, np.ndarray]], server_round: int = 1):  # noqa: ANN201
        sent = _global()
        grid = LocalGrid(None, len(updates))  # type: ignore[arg-type]  # only sampling is used
        messages = self.strategy.configure_train(
            server_round, ArrayRecord({k: Array(v) for k, v in sent.items()}), ConfigRecord(), grid)
        instructions = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        replies = []
        for k, (instruction, update) in enumerate(zip(instructions, updates, strict=True)):
            instruction.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does on push
            arrays = ArrayRecord({key: Array((sent[key] + update[key]).astype(np.float32)) for key in sent})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 100 + 10 * k}),
                                  "site": ConfigRecord({"site-name": SITES[k]})})
            replies.append(Message(content, reply_to=instruction))
        return self.strategy.aggregate_train(server_round, replies)

    def aggregated_sites(self) -> list[str]:
        return [str(m.content["site"]["site-name"]) for m in self.inner.seen[-1]]


def _sign_flipped(update: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """What ``--misbehave SITE=signflip:F`` sends: ``g - F (w - g)``."""
    return {k: -factor * v for k, v in update.items()}


def test_a_sign_flipped_x5_update_inside_the_norm_bound_is_refused_by_name() -> None:
    updates = _honest_updates(4)
    updates[3] = _sign_flipped(updates[3], 5)

    unscreened = Chain(ScreenSettings(enabled=False))
    unscreened.round(updates)
    assert unscreened.rejected == [], "5x is inside the 10x norm bound: validation alone lets it in"

    chain = Chain()
    arrays, _ = chain.round(updates)
    ((server_round, site, reason),) = chain.rejected
    assert (server_round, site) == (1, "site-d")
    assert reason.startswith("direction: cosine -") and "screen-min-cosine 0" in reason, reason
    assert chain.aggregated_sites() == ["site-a", "site-b", "site-c"]

    # no influence: the same weights as FedAvg over the three honest sites alone
    honest = Chain()
    expected, _ = honest.round(updates[:3])
    for key in expected:
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy())


def test_a_plain_sign_flip_is_refused_too() -> None:
    updates = _honest_updates(4)
    updates[3] = _sign_flipped(updates[3], 1)
    chain = Chain()
    chain.round(updates)
    assert [(s, m.split(":")[0]) for _, s, m in chain.rejected] == [("site-d", "direction")]


def test_a_scaled_update_is_refused_by_its_norm_ratio() -> None:
    updates = _honest_updates(4)
    updates[1] = {k: 5 * v for k, v in updates[1].items()}  # what ``scale:5`` sends: the right direction
    chain = Chain()
    chain.round(updates)
    ((_, site, reason),) = chain.rejected
    assert site == "site-b"
    assert reason.startswith("norm-ratio: update norm ") and "above screen-max-norm-ratio 3" in reason, reason
    assert chain.aggregated_sites() == ["site-a", "site-c", "site-d"]


def test_honest_non_iid_sites_are_not_refused_and_their_scores_are_reported() -> None:
    for seed in range(20):  # many draws of unequal, partly disagreeing sites
        chain = Chain()
        chain.round(_honest_updates(4, seed=seed))
        assert chain.rejected == [], (seed, chain.scores)
        assert chain.aggregated_sites() == list(SITES)
        assert [s.site for s in chain.scores] == list(SITES)
        assert all(0 < s.cosine <= 1 and s.norm_ratio < 3 for s in chain.scores), chain.scores


def test_three_sites_still_have_a_robust_centre() -> None:
    updates = _honest_updates(3)
    updates[2] = _sign_flipped(updates[2], 5)
    chain = Chain()
    chain.round(updates)
    assert [(s, m.split(":")[0]) for _, s, m in chain.rejected] == [("site-c", "direction")]
    assert chain.aggregated_sites() == ["site-a", "site-b"]
    clean = Chain()
    clean.round(_honest_updates(3))
    assert clean.rejected == []


def test_two_sites_that_disagree_are_both_refused_and_the_round_changes_nothing() -> None:
    """Two updates have no robust centre (their median is their mean, which the attacker owns):
    which one is honest cannot be told, so neither is aggregated."""
    updates = _honest_updates(2)
    updates[1] = _sign_flipped(updates[1], 5)
    chain = Chain()
    assert chain.round(updates) == (None, None)
    assert [s for _, s, _ in chain.rejected] == ["site-a", "site-b"]
    assert all(m.startswith("conflict: the round's two updates disagree") and "cannot be told" in m
               for _, _, m in chain.rejected)
    assert chain.inner.seen == []

    honest = Chain()
    arrays, _ = honest.round(_honest_updates(2))
    assert arrays is not None and honest.rejected == [] and honest.aggregated_sites() == ["site-a", "site-b"]


def test_two_sites_of_very_different_sizes_conflict() -> None:
    updates = _honest_updates(2)
    updates[1] = {k: 5 * v for k, v in updates[0].items()}
    chain = Chain()
    assert chain.round(updates) == (None, None)
    assert all("norm ratio 5" in m for _, _, m in chain.rejected), chain.rejected


def test_client_level_dp_voids_a_round_with_a_screened_update() -> None:
    updates = _honest_updates(4)
    updates[3] = _sign_flipped(updates[3], 5)
    chain = Chain(all_or_nothing=True)
    assert chain.round(updates) == (None, None)
    assert [s for _, s, _ in chain.rejected] == ["site-d"] and chain.inner.seen == []


def test_with_local_norm_the_sites_own_layers_are_not_scored() -> None:
    """FedBN: each site sends its own normalisation layers, far from the global average."""
    updates = _honest_updates(4)
    updates[2]["enc.bias"] = updates[2]["enc.bias"] - 1.5  # site-c's own layer: 6x a step, inside 10x
    plain = Chain()
    plain.round(updates)
    assert [s for _, s, _ in plain.rejected] == ["site-c"]
    local = Chain(ignore_keys=frozenset({"enc.bias"}))
    local.round(updates)
    assert local.rejected == [] and local.aggregated_sites() == list(SITES)


def test_thresholds_come_from_the_run_config_and_bad_ones_are_refused() -> None:
    default = FederationConfig.from_run_config(fused_run_config(default_app_dir(), ""))
    assert default.screen == ScreenSettings(enabled=True, min_cosine=0.0, max_norm_ratio=3.0)
    tuned = FederationConfig.from_run_config(fused_run_config(
        default_app_dir(), "screen-min-cosine=0.2 screen-max-norm-ratio=2.5"))
    assert (tuned.screen.min_cosine, tuned.screen.max_norm_ratio) == (0.2, 2.5)
    assert tuned.as_params()["screen-max-norm-ratio"] == 2.5
    with pytest.raises(RunConfigError, match="screen-min-cosine must lie in \\[-1, 1\\), got 1.5"):
        FederationConfig.from_run_config(fused_run_config(default_app_dir(), "screen-min-cosine=1.5"))
    with pytest.raises(RunConfigError, match="screen-max-norm-ratio must be > 1, got 0.5"):
        FederationConfig.from_run_config(fused_run_config(default_app_dir(), "screen-max-norm-ratio=0.5"))
    with pytest.raises(StrategyConfigError):
        ScreenSettings(max_norm_ratio=1.0)


def test_scores_are_cosines_to_the_median_and_norms_over_the_median_norm() -> None:
    a = {"w": np.array([1.0, 0.0])}
    b = {"w": np.array([0.0, 2.0])}
    c = {"w": np.array([1.0, 1.0])}
    d = {"w": np.array([-5.0, -5.0])}
    # coordinate-wise median of a, b, c, d: (0.5, 0.5); norms 1, 2, 1.414, 7.07 -> median 1.707
    (ca, ra), (cb, rb), (cc, rc), (cd, rd) = score_updates([a, b, c, d])
    assert ca == pytest.approx(np.sqrt(0.5)) and cb == pytest.approx(np.sqrt(0.5))
    assert cc == pytest.approx(1.0) and cd == pytest.approx(-1.0)
    median = (2 + np.sqrt(2)) / 2
    assert (ra, rb, rd) == pytest.approx((1 / median, 2 / median, np.sqrt(50) / median))
    assert score_updates([a]) == [(1.0, 1.0)]
    ((c0, r0), (c1, r1)) = score_updates([a, b])
    assert (c0, c1) == (0.0, 0.0) and (r0, r1) == (0.5, 2.0)


@pytest.mark.slow
def test_a_simulated_four_site_federation_refuses_the_poisoning_site(tmp_path, fedseg_home) -> None:  # noqa: ANN001
    """The attack end to end: Flower's simulation engine (Ray), the real ServerApp and ClientApp,
    site-d sending 5x its sign-flipped update through ``--misbehave``."""
    import json
    import subprocess
    import sys

    from registry import default_store
    from simulation.synthetic import write_synthetic_sites

    sites = write_synthetic_sites(tmp_path / "sites", sites=4, patients_per_site=4, slices=8, size=32, seed=7)
    fedseg = [sys.executable, "-m", "fedseg.cli"]
    run = subprocess.run(
        [*fedseg, "simulate", "run", "--sites-dir", str(tmp_path / "sites"), "--misbehave", "site-d=signflip:5",
         "--run-config", "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8 min-sites=4 "
                         "model-name='screen-e2e'"],
        capture_output=True, text=True, timeout=900,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "round 1: rejected the update of site-d: direction: cosine -" in log, log[-4000:]
    # later rounds may catch it by size instead (see tests/test_robustness_figures.py)
    assert re.search(r"round 2: rejected the update of site-d: (direction|norm-ratio): ", log), log[-4000:]
    assert all(f"rejected the update of {p.name}" not in log for p in sites[:3]), log[-4000:]

    listed = subprocess.run([*fedseg, "registry", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    (version,) = json.loads(listed.stdout)
    assert json.loads(version["tags"]["strategy_params"])["screen_max_norm_ratio"] == 3.0
    client = default_store().client()
    run_id = version["tags"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "site/site-d/train/rejected")] == [1, 2]
    assert all(client.get_metric_history(run_id, f"site/{p.name}/train/rejected") == [] for p in sites[:3])
    cosines = client.get_metric_history(run_id, "site/site-d/train/screen_cosine")
    assert len(cosines) == 2 and cosines[0].value < 0
