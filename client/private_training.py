"""One DP-SGD round at a site: policy, budget check against the durable ledger, train, record.

The noise and Poisson sampling draw from the OS random source, never from the round's seed: the
coordinator knows that seed and could otherwise replay the noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from imaging.instructions import RoundInstructions
from privacy import (
    DPConfig,
    PrivacyLedger,
    make_private_training,
    noise_for_target_epsilon,
    poisson_sample_rate,
    steps_per_epoch,
)

from .errors import PolicyViolation
from .policy import SitePolicy
from .site import Site

__all__ = ["DPRoundResult", "check_policy", "train_private_round"]

log = logging.getLogger("fedseg.client")


@dataclass(frozen=True)
class DPRoundResult:
    loss: float
    num_examples: int
    steps: int
    noise_multiplier: float
    delta: float
    epsilon: float  # everything this site has spent on (consortium, model), this round included


def check_policy(instructions: RoundInstructions, policy: SitePolicy) -> None:
    """Refuse a round that breaks the site's policy, naming the rule."""
    if policy.require_dp and not instructions.dp:
        raise PolicyViolation(
            f"site policy {policy.source} requires DP ([privacy] require_dp = true) but the run has dp=false",
            rule="privacy.require_dp",
        )
    if policy.max_local_epochs is not None and instructions.local_epochs > policy.max_local_epochs:
        raise PolicyViolation(
            f"site policy {policy.source} allows at most {policy.max_local_epochs} local epochs "
            f"([training] max_local_epochs), the run asks for {instructions.local_epochs}",
            rule="training.max_local_epochs",
        )


def _delta(ledger: PrivacyLedger, instructions: RoundInstructions, num_train: int) -> float:
    """δ is fixed by the site's first DP round for this consortium and model."""
    history = ledger.entries(instructions.consortium, instructions.model_name)
    if history:
        return history[0].delta
    config = DPConfig(enabled=True, noise_multiplier=1.0, delta=instructions.delta or None)
    return config.delta_for(num_train)


def train_private_round(
    net: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    instructions: RoundInstructions,
    site: Site,
    policy: SitePolicy,
    run_id: str,
    device: torch.device,
) -> DPRoundResult:
    """DP-SGD for the round's local epochs, within the site's ε budget, recorded in its ledger."""
    ledger = PrivacyLedger(site.ledger_path)
    consortium, model = instructions.consortium, instructions.model_name
    n = len(images)
    delta = _delta(ledger, instructions, n)
    rate = poisson_sample_rate(n, instructions.batch_size)
    steps = instructions.local_epochs * steps_per_epoch(rate)
    sigma = instructions.noise_multiplier
    if instructions.target_epsilon > 0:  # ε for the whole run: spread over all its rounds
        sigma = noise_for_target_epsilon(
            target_epsilon=instructions.target_epsilon, delta=delta, sample_rate=rate,
            steps=steps * max(instructions.num_rounds, 1), accountant="rdp",
        )
    if policy.epsilon_budget is not None:
        ledger.check_budget(consortium, model, budget=policy.epsilon_budget, delta=delta,
                            noise_multiplier=sigma, sample_rate=rate, steps=steps)
    config = DPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=instructions.max_grad_norm,
                      delta=delta)
    result = make_private_training(
        net, images, masks, config=config, batch_size=instructions.batch_size,
        epochs=instructions.local_epochs, learning_rate=instructions.learning_rate,
        device=device, seed=None,
    )
    ledger.record(consortium, model, run_id=run_id, round=instructions.server_round,
                  noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                  steps=result.steps, delta=result.delta)
    epsilon = ledger.spent(consortium, model, result.delta)
    log.info("site %s round %d: DP-SGD sigma %.3f, %d steps, epsilon spent %.3f (delta %.2g)",
             site.name, instructions.server_round, result.noise_multiplier, result.steps, epsilon,
             result.delta)
    return DPRoundResult(result.loss, result.num_examples, result.steps, result.noise_multiplier,
                         result.delta, epsilon)
