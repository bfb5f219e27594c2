"""Golden tests of DP-SGD and the privacy ledger (privacy/)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from imaging.model import build_unet
from imaging.spec import ModelSpec
from privacy import (
    BudgetExceededError,
    DPConfig,
    LedgerError,
    PrivacyConfigError,
    PrivacyError,
    PrivacyLedger,
    compose_epsilon,
    default_delta,
    make_private_training,
    per_sample_loss,
    poisson_sample_rate,
)

pytestmark = pytest.mark.privacy

CPU = torch.device("cpu")
TINY = ModelSpec(channels=(4, 8), image_size=16)


def _data(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32)
    masks = (rng.random((n, size, size)) > 0.8).astype(np.float32)
    return images, masks


# ---------------------------------------------------------------- (a) the accountant


def test_rdp_accountant_reproduces_published_epsilon() -> None:
    # σ = 1.5, q = 0.04, 2,250 steps (MNIST-like: 60 epochs at q = 0.04), δ = 1e-5: ε ≈ 7.33.
    accountant = RDPAccountant()
    accountant.history.append((1.5, 0.04, 2250))
    epsilon = accountant.get_epsilon(delta=1e-5)
    assert epsilon == pytest.approx(7.33, abs=0.05)
    assert epsilon == pytest.approx(7.3291, abs=1e-3)  # opacus 1.6.0, default orders (best α=3.9)
    assert compose_epsilon([(1.5, 0.04, 2250)], delta=1e-5, accountant="rdp") == epsilon
    # PRV is numerically tighter than the RDP bound for the same mechanism.
    prv = compose_epsilon([(1.5, 0.04, 2250)], delta=1e-5, accountant="prv")
    assert 6.0 < prv < epsilon


# ---------------------------------------------------------------- (b) the ledger composes


ROUNDS = [(1.1, 0.05, 100), (1.1, 0.05, 250), (1.3, 0.05, 60)]


def _record_rounds(ledger: PrivacyLedger, rounds=ROUNDS, delta: float = 1e-5) -> None:
    for number, (sigma, q, steps) in enumerate(rounds, start=1):
        ledger.record(
            "site", run_id="run-1", round=number, consortium="consortium-a", model="fedseg-unet",
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta,
        )


def test_ledger_epsilon_equals_one_accountant_over_all_steps(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    assert ledger.spent("site", 1e-5) == 0.0
    _record_rounds(ledger)

    one = RDPAccountant()
    for mechanism in ROUNDS:
        one.history.append(mechanism)
    expected = one.get_epsilon(delta=1e-5)
    assert ledger.spent("site", 1e-5) == pytest.approx(expected, rel=1e-12)
    # More than any single round: a fresh engine per round would under-report.
    assert expected > max(compose_epsilon([m], delta=1e-5, accountant="rdp") for m in ROUNDS)

    reloaded = PrivacyLedger(path)  # as after a process restart
    assert reloaded.spent("site") == pytest.approx(expected, rel=1e-12)
    assert [e.steps for e in reloaded.entries("site")] == [100, 250, 60]
    # Keyed by the site's budget scope (issue 15): what a run calls its consortium or model is
    # recorded but does not scope ε; only another scope the site's policy names starts apart.
    assert {(e.consortium, e.model) for e in reloaded.entries("site")} == {("consortium-a", "fedseg-unet")}
    assert reloaded.spent("other-scope", 1e-5) == 0.0

    data = json.loads(json.dumps(reloaded.to_dict()))
    summary = data["summary"]["site"]
    assert summary["epsilon"] == pytest.approx(expected) and summary["steps"] == 410
    assert summary["runs_as"] == ["consortium-a/fedseg-unet"]
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temporary files


def test_ledger_refuses_mixing_deltas(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    _record_rounds(ledger, ROUNDS[:1], delta=1e-5)
    with pytest.raises(LedgerError, match="accounted at δ=1e-05"):
        ledger.record("site", run_id="r", round=2, noise_multiplier=1.0,
                      sample_rate=0.05, steps=10, delta=1e-6)
    with pytest.raises(LedgerError, match="accounted at δ=1e-05"):
        ledger.spent("site", 1e-6)
    assert len(ledger.entries("site")) == 1


def test_ledger_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"

    def write(worker: int) -> None:
        ledger = PrivacyLedger(path)  # separate instances share the per-path lock
        for i in range(5):
            ledger.record("site", run_id=f"w{worker}", round=i, noise_multiplier=1.0,
                          sample_rate=0.1, steps=1, delta=1e-5)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(PrivacyLedger(path).entries("site")) == 20  # and one unbroken hash chain


# ---------------------------------------------------------------- (c) per-sample gradients


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_unet_per_sample_gradients_equal_batch_of_one_gradients() -> None:
    torch.manual_seed(0)
    net = build_unet(TINY).train()
    gsm = GradSampleModule(net)
    loss_fn = per_sample_loss()
    x = torch.rand(4, 1, 16, 16)
    y = (torch.rand(4, 1, 16, 16) > 0.7).float()
    loss_fn(gsm(x), y).backward()
    per_sample = {name: p.grad_sample.clone() for name, p in net.named_parameters()}
    gsm.disable_hooks()  # the references below must not touch grad_sample
    params = dict(net.named_parameters())
    for i in range(len(x)):
        single = torch.autograd.grad(loss_fn(net(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for name, grad in zip(params, single):
            torch.testing.assert_close(per_sample[name][i], grad, atol=1e-5, rtol=0)
    gsm.cleanup()


def test_batch_pooled_dice_is_not_per_sample_decomposable() -> None:
    # Why DP-SGD uses batch=False: with batch=True one slice's gradient depends on the others.
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = build_unet(TINY).train()
    x, y = torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.7).float()
    pooled, split = DiceCELoss(sigmoid=True, batch=True), per_sample_loss()
    params = list(net.parameters())
    g_pooled = torch.autograd.grad(pooled(net(x), y), params)
    g_mean = [sum(gs) / 2 for gs in zip(*(torch.autograd.grad(split(net(x[i:i+1]), y[i:i+1]), params) for i in range(2)))]
    g_split = torch.autograd.grad(split(net(x), y), params)
    for a, b in zip(g_split, g_mean):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert max((a - b).abs().max().item() for a, b in zip(g_pooled, g_mean)) > 1e-4


# ---------------------------------------------------------------- (d) the budget


def test_over_budget_projection_names_the_remaining_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    _record_rounds(ledger, ROUNDS[:1])
    spent = ledger.spent("site", 1e-5)
    projected = ledger.projected("site", 1e-5, 1.1, 0.05, 250)
    assert projected > spent
    budget = (spent + projected) / 2
    with pytest.raises(BudgetExceededError) as caught:
        ledger.check_budget("site", budget=budget, delta=1e-5,
                            noise_multiplier=1.1, sample_rate=0.05, steps=250)
    error = caught.value
    assert isinstance(error, PrivacyError)
    assert error.remaining == pytest.approx(budget - spent)
    assert f"remaining budget {budget - spent:.4f}" in str(error)
    assert f"ε={projected:.4f} > budget {budget:.4f}" in str(error)
    ok = ledger.check_budget("site", budget=projected + 0.1, delta=1e-5,
                             noise_multiplier=1.1, sample_rate=0.05, steps=250)
    assert ok == pytest.approx(projected)


# ---------------------------------------------------------------- (e) DP training


def test_dp_training_from_target_epsilon_keeps_keys_and_budget() -> None:
    torch.manual_seed(0)
    net = build_unet(TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images, masks = _data(10)
    config = DPConfig(enabled=True, target_epsilon=3.0, max_grad_norm=1.0)
    result = make_private_training(net, images, masks, config=config, batch_size=2, epochs=2,
                                   learning_rate=1e-3, device=CPU, seed=1)
    after = net.state_dict()
    assert list(after) == list(before)
    assert not any(k.startswith("_module.") for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())  # hooks cleaned up

    assert result.num_examples == 10 and result.sample_rate == poisson_sample_rate(10, 2) == 0.2
    assert result.steps == 2 * 5
    assert result.delta == default_delta(10) == 1e-5
    achieved = compose_epsilon([(result.noise_multiplier, result.sample_rate, result.steps)],
                               delta=result.delta, accountant="rdp")
    assert achieved <= 3.0 and achieved == pytest.approx(result.epsilon)
    assert achieved > 2.9  # the search stops within Opacus' tolerance (0.01), not far below
    assert math.isfinite(result.loss)


def test_dp_training_steps_through_empty_poisson_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # q = 1/20: a batch is empty with probability 0.95^20 ≈ 0.36; each still takes a noisy step.
    import privacy.dpsgd as dpsgd

    empty_steps: list[float] = []
    noise_only = dpsgd._noise_only_step

    def spy(optimizer, params):
        before = [p.detach().clone() for p in params]
        noise_only(optimizer, params)
        empty_steps.append(max((p - b).abs().max().item() for p, b in zip(params, before)))

    monkeypatch.setattr(dpsgd, "_noise_only_step", spy)
    net = build_unet(TINY)
    images, masks = _data(20)
    config = DPConfig(enabled=True, noise_multiplier=1.0)
    result = make_private_training(net, images, masks, config=config, batch_size=1, epochs=1,
                                   learning_rate=1e-3, device=CPU, seed=3)
    assert result.steps == 20 and result.sample_rate == 0.05
    assert empty_steps and all(change > 0 for change in empty_steps)  # noise moved the weights
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_dp_training_is_reproducible_with_a_test_seed() -> None:
    images, masks = _data(8)
    config = DPConfig(enabled=True, noise_multiplier=1.0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_unet(TINY)
        make_private_training(net, images, masks, config=config, batch_size=4, epochs=1,
                              learning_rate=1e-3, device=CPU, seed=5)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_dp_training_refuses_batch_norm_naming_the_layer() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2),
                              torch.nn.Conv2d(2, 1, 1))
    images, masks = _data(4)
    with pytest.raises(PrivacyConfigError, match=r"offending layers: 1 \(BatchNorm2d\)"):
        make_private_training(net, images, masks, config=DPConfig(enabled=True, noise_multiplier=1.0),
                              batch_size=2, epochs=1, learning_rate=1e-3, device=CPU, seed=0)


def test_dp_training_refuses_disabled_config() -> None:
    images, masks = _data(4)
    with pytest.raises(PrivacyConfigError, match="disabled"):
        make_private_training(build_unet(TINY), images, masks, config=DPConfig(), batch_size=2,
                              epochs=1, learning_rate=1e-3, device=CPU)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 3.0}, "not both"),
        ({"enabled": True}, "neither noise_multiplier nor target_epsilon"),
        ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm must be"),
        ({"enabled": True, "noise_multiplier": 0.0}, "noise_multiplier must be"),
        ({"enabled": True, "noise_multiplier": 1.0, "delta": 1.5}, r"delta must lie in \(0, 1\)"),
        ({"enabled": True, "noise_multiplier": 1.0, "accountant": "gdp"}, "accountant must be"),
    ],
)
def test_dp_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(PrivacyConfigError, match=message) as caught:
        DPConfig(**kwargs)
    assert isinstance(caught.value, ValueError)


def test_dp_config_delta_must_be_below_one_over_n() -> None:
    config = DPConfig(enabled=True, noise_multiplier=1.0, delta=0.05)
    assert config.delta_for(10) == 0.05
    with pytest.raises(PrivacyConfigError, match=r"delta=0.05 must be below 1/N = 0.05 for N=20"):
        config.delta_for(20)
    assert DPConfig(enabled=True, noise_multiplier=1.0).delta_for(50_000) == pytest.approx(2e-6)
    images, masks = _data(20)
    with pytest.raises(PrivacyConfigError, match="must be below 1/N"):
        make_private_training(build_unet(TINY), images, masks, config=config, batch_size=2,
                              epochs=1, learning_rate=1e-3, device=CPU)


# ---------------------------------------------------------------- (f) a corrupt ledger


@pytest.mark.parametrize(
    "content",
    ['{"format": "fedseg-privacy-ledger", "version": 1, "ledgers": {"c": {"m": [{"run',
     "",
     '{"format": "fedseg-privacy-ledger", "version": 1, "ledgers": {"c": {"m": [{"steps": -1}]}}}',
     '{"something": "else"}'],
    ids=["truncated", "empty", "bad-entry", "foreign"],
)
def test_corrupt_ledger_is_refused_not_reset(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LedgerError, match=rf"privacy ledger {path} is corrupt"):
        PrivacyLedger(path)
    assert path.read_text(encoding="utf-8") == content  # left as found, for forensics
