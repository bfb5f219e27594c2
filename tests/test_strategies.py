"""Strategy choice: Flower's own classes, configured from typed settings, refused when they cannot work."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from local_grid import LocalGrid

from aggregation import (
    PROXIMAL_MU_KEY,
    STRATEGIES,
    StrategyConfigError,
    StrategySettings,
    build_strategy,
    norm_parameter_names,
    split_norm,
)

CASES = {
    "fedavg": (FedAvg, {}, {}),
    "fedprox": (FedProx, {"proximal_mu": 0.01}, {"proximal_mu": 0.01}),
    "fedadam": (FedAdam, {"eta": 0.05, "beta_1": 0.8}, {"eta": 0.05, "eta_l": 1e-1, "beta_1": 0.8, "beta_2": 0.99, "tau": 1e-3}),
    "fedyogi": (FedYogi, {"tau": 1e-2}, {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-2}),
    "fedadagrad": (FedAdagrad, {"eta_l": 0.2}, {"eta": 1e-1, "eta_l": 0.2, "beta_1": 0.0, "beta_2": 0.0}),
    "fedmedian": (FedMedian, {"num_malicious": 1}, {}),
    "fedtrimmedavg": (FedTrimmedAvg, {"trim_beta": 0.25}, {"beta": 0.25}),
    "krum": (Krum, {"num_malicious": 1}, {"num_malicious_nodes": 1, "num_nodes_to_select": 1}),
    "multikrum": (MultiKrum, {"num_malicious": 1, "num_krum_select": 3}, {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    "bulyan": (Bulyan, {"num_malicious": 1, "min_sites": 7}, {"num_malicious_nodes": 1}),
}


def test_every_strategy_name_has_a_case() -> None:
    assert set(CASES) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_strategy_returns_flowers_own_class(name: str) -> None:
    cls, knobs, expected = CASES[name]
    settings = StrategySettings(name=name, **{"min_sites": 5, **knobs})
    strategy = build_strategy(settings)
    assert type(strategy) is cls
    assert strategy.weighted_by_key == "num-examples"
    assert strategy.min_train_nodes == strategy.min_available_nodes == settings.min_sites
    assert strategy.fraction_train == 1.0
    for attr, value in expected.items():
        assert getattr(strategy, attr) == pytest.approx(value), attr


def test_multikrum_selects_the_honest_count_by_default() -> None:
    strategy = build_strategy(StrategySettings(name="multikrum", min_sites=6, num_malicious=1))
    assert strategy.num_nodes_to_select == 5


def test_client_dp_wraps_a_mean_strategy() -> None:
    strategy = build_strategy(StrategySettings(name="fedprox", proximal_mu=0.1, client_dp=True))
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert type(strategy.strategy) is FedProx and strategy.num_sampled_clients == 2


def test_fedprox_sends_proximal_mu_in_the_train_config() -> None:
    strategy = build_strategy(StrategySettings(name="fedprox", proximal_mu=0.05))
    grid = LocalGrid(None, 2)  # type: ignore[arg-type]  # only sampling is used
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    (first, *_) = strategy.configure_train(1, arrays, ConfigRecord({"local-epochs": 1}), grid)
    assert PROXIMAL_MU_KEY == "proximal-mu"
    assert first.content["config"][PROXIMAL_MU_KEY] == 0.05
    assert first.content["config"]["server-round"] == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "fedprox", "proximal_mu": -0.1}, r"proximal-mu must be >= 0, got -0.1"),
        ({"name": "fedavg", "proximal_mu": 0.1}, r"proximal-mu=0.1 is a FedProx setting, but strategy is 'fedavg'"),
        ({"name": "krum", "min_sites": 4, "num_malicious": 1}, r"krum with num-malicious=1 needs min-sites >= 2\*f\+3 = 5"),
        ({"name": "multikrum", "min_sites": 6, "num_malicious": 2}, r"multikrum with num-malicious=2 needs min-sites >= 2\*f\+3 = 7"),
        ({"name": "multikrum", "min_sites": 5, "num_malicious": 1, "num_krum_select": 5},
         r"num-krum-select must lie in \[1, min-sites - num-malicious\] = \[1, 4\], got 5"),
        ({"name": "bulyan", "min_sites": 6, "num_malicious": 1}, r"bulyan with num-malicious=1 needs min-sites >= 4\*f\+3 = 7"),
        ({"name": "fedmedian", "min_sites": 4, "num_malicious": 2}, r"fedmedian tolerates fewer than half"),
        ({"name": "fedtrimmedavg", "min_sites": 4, "num_malicious": 1, "trim_beta": 0.2},
         r"cuts 0 site\(s\) per tail at min-sites=4, fewer than num-malicious=1"),
        ({"name": "fedtrimmedavg", "trim_beta": 0.5}, r"trim-beta must lie in \(0, 0.5\), got 0.5"),
        ({"name": "fedavg", "num_malicious": 1}, r"num-malicious=1 needs a robust strategy"),
        ({"name": "krum", "min_sites": 5, "num_krum_select": 2}, r"num-krum-select is a MultiKrum setting"),
        ({"name": "fedavg", "eta": 0.1}, r"eta are FedOpt settings .* but strategy is 'fedavg'"),
        ({"name": "fedadam", "beta_2": 1.0}, r"beta-2 must lie in \[0, 1\), got 1.0"),
        ({"name": "fedyogi", "eta": 0.0}, r"eta must be > 0, got 0.0"),
        ({"name": "fedadagrad", "beta_1": 0.9}, r"fedadagrad takes no beta-1 / beta-2"),
        ({"name": "fedmedian", "client_dp": True},
         r"client-dp=true cannot wrap the robust strategy 'fedmedian'.*calibrates its noise"),
        ({"name": "krum", "min_sites": 5, "client_dp": True}, r"cannot wrap the robust strategy 'krum'"),
        ({"name": "fedadam", "client_dp": True}, r"cannot wrap the adaptive-optimizer strategy 'fedadam'"),
        ({"name": "fedavg", "client_dp": True, "fraction_train": 0.5}, r"client-dp=true needs fraction-train=1.0"),
        ({"name": "fedfoo"}, r"unknown strategy 'fedfoo'"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(StrategyConfigError, match=message):
        StrategySettings(**settings)


def test_params_name_only_what_shapes_the_strategy() -> None:
    assert StrategySettings(name="fedprox", proximal_mu=0.1).params() == {
        "fraction_train": 1.0, "min_sites": 2, "proximal_mu": 0.1}
    assert StrategySettings(name="multikrum", min_sites=5, num_malicious=1).params() == {
        "fraction_train": 1.0, "min_sites": 5, "num_malicious": 1, "num_krum_select": 4}


# --------------------------------------------------------------------------- robustness, in numbers

BASE = np.array([1.0, 2.0, 3.0, -1.0, 0.5, 2.0], dtype=np.float32)


def _round_replies(strategy, n: int, attacker: int | None) -> tuple[list[Message], np.ndarray]:  # noqa: ANN001
    grid = LocalGrid(None, n)  # type: ignore[arg-type]
    glob = ArrayRecord({"w": Array(np.zeros_like(BASE))})
    instructions = list(strategy.configure_train(1, glob, ConfigRecord(), grid))
    rng = np.random.default_rng(0)
    replies, clean = [], []
    for k, ins in enumerate(sorted(instructions, key=lambda m: m.metadata.dst_node_id)):
        ins.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does on push
        update = (BASE + rng.normal(0, 0.01, BASE.shape)).astype(np.float32)
        if k == attacker:
            update = -5 * BASE  # sign-flipped, scaled x5
        else:
            clean.append(update)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(update)}),
                              "metrics": MetricRecord({"num-examples": 10})})
        replies.append(Message(content, reply_to=ins))
    return replies, np.mean(clean, axis=0)


@pytest.mark.parametrize(
    ("name", "knobs"),
    [("fedmedian", {}), ("krum", {"num_malicious": 1}), ("multikrum", {"num_malicious": 1}),
     ("fedtrimmedavg", {"trim_beta": 0.2})],
)
def test_robust_strategies_resist_a_sign_flipped_site_fedavg_does_not(name: str, knobs: dict) -> None:
    robust = build_strategy(StrategySettings(name=name, min_sites=5, **knobs))
    replies, clean_mean = _round_replies(robust, 5, attacker=2)
    arrays, _ = robust.aggregate_train(1, replies)
    robust_error = float(np.abs(arrays["w"].numpy() - clean_mean).max())

    fedavg = build_strategy(StrategySettings(name="fedavg", min_sites=5))
    replies, clean_mean = _round_replies(fedavg, 5, attacker=2)
    arrays, _ = fedavg.aggregate_train(1, replies)
    fedavg_result = arrays["w"].numpy()

    assert robust_error < 0.05
    # FedAvg: (4 x BASE - 5 x BASE) / 5 = -BASE / 5, off by 1.2 x |BASE| (3.6 at most)
    np.testing.assert_allclose(fedavg_result, -BASE / 5, atol=0.02)
    assert float(np.abs(fedavg_result - clean_mean).max()) > 3.0


def test_bulyan_resists_a_sign_flipped_site_among_seven() -> None:
    bulyan = build_strategy(StrategySettings(name="bulyan", min_sites=7, num_malicious=1))
    replies, clean_mean = _round_replies(bulyan, 7, attacker=0)
    arrays, _ = bulyan.aggregate_train(1, replies)
    assert float(np.abs(arrays["w"].numpy() - clean_mean).max()) < 0.05


# --------------------------------------------------------------------------- FedBN: norm layers


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_norm_parameter_names_of_the_monai_unet(norm: str) -> None:
    from imaging.model import build_unet
    from imaging.spec import ModelSpec

    net = build_unet(ModelSpec(norm=norm))
    keys = list(net.state_dict())
    names = norm_parameter_names(keys, net)
    assert len(names) == 12 and len(keys) == 38
    assert all(".adn.N." in k and k.rsplit(".", 1)[1] in ("weight", "bias") for k in names)
    assert "model.0.conv.unit0.adn.N.weight" in names
    assert not any("conv.weight" in k or k.endswith("conv.bias") for k in names)
    # Opacus-wrapped names keep matching
    assert norm_parameter_names([f"_module.{k}" for k in keys], net) == {f"_module.{k}" for k in names}
    shared, local = split_norm(net.state_dict(), names)
    assert set(local) == names and len(shared) == 26


def test_local_norm_keeps_each_sites_normalisation_layers(synthetic_sites, fedseg_home) -> None:
    """FedBN-style: each site trains with its own norm layers, not the averages (it evaluates
    the received model and, beside it, its own variant: tests/test_gate_evidence.py)."""
    import torch
    from local_grid import LocalGrid

    from client.app import create_client_app
    from client.local_norm import local_norm_path
    from client.site import PartitionSites
    from imaging.model import build_unet
    from imaging.norm_layers import norm_parameter_names
    from registry import default_store, load_model
    from server.config import FederationConfig
    from server.federation import run_federation
    from simulation.engine import default_app_dir, fused_run_config

    config = FederationConfig.from_run_config(fused_run_config(
        default_app_dir(), "num-server-rounds=2 image-size=32 unet-channels='8,16' batch-size=8 local-norm=true"))
    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    outcome = run_federation(grid, config, default_store(), progress=lambda _: None)
    own = {s.name: torch.load(local_norm_path(s.name, "1"), weights_only=True) for s in synthetic_sites}
    names = norm_parameter_names(build_unet(config.instructions.spec).state_dict().keys(),
                                 build_unet(config.instructions.spec))
    assert set(own["site-a"]) == set(names) and len(names) > 0
    published = load_model(default_store(), f"models:/fedseg-unet/{outcome.published.version}").state_dict
    key = sorted(names)[0]
    assert not torch.equal(own["site-a"][key], own["site-b"][key])
    assert not torch.equal(own["site-a"][key], published[key])  # the average is not what a site uses
    # what a site keeps is what it trained last round
    last_a = [r for r in grid.replies if r.metadata.message_type == "train"
              and r.content["site"]["site-name"] == "site-a"][-1]
    sent = last_a.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], own["site-a"][k]) for k in names)
    # and a global model received next is overwritten with the site's own layers
    from client.local_norm import apply_local_norm

    net = build_unet(config.instructions.spec)
    net.load_state_dict(published)
    assert apply_local_norm(net, "site-a", "1") == len(names)
    assert torch.equal(net.state_dict()[key], own["site-a"][key])
    assert apply_local_norm(net, "site-a", "2") == 0  # another run starts from the global layers
