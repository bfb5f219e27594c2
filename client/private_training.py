"""One DP-SGD round at a site: policy floors and caps, budget checks against the durable ledger,
train, record.

The ledger is the site's, scoped by its policy's ``[privacy] budget_scope`` (default: the whole
site), never by what the run calls its consortium or model. Every rule that the run's settings
alone decide is checked before any data is read (:func:`check_policy`, :func:`check_spend`);
those that need the size of the training split (σ from ``target-epsilon``, the coming round's ε)
are checked after the data set is loaded and before any training step.

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

__all__ = ["DPRoundResult", "check_policy", "check_spend", "train_private_round"]

log = logging.getLogger("fedseg.client")


@dataclass(frozen=True)
class DPRoundResult:
    loss: float
    num_examples: int
    steps: int
    noise_multiplier: float
    delta: float
    epsilon: float  # everything this site has spent in its budget scope, this round included


def check_policy(instructions: RoundInstructions, policy: SitePolicy) -> None:
    """Refuse a round whose settings alone break the site's policy, naming the rule."""
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
    if not instructions.dp:
        return
    if instructions.target_epsilon <= 0:  # σ given: its floor is known before any data is read
        _check_noise_floor(instructions.noise_multiplier, policy)
    cap = policy.max_epsilon_per_run
    if cap is not None and instructions.target_epsilon > cap:
        raise PolicyViolation(
            f"site policy allows at most ε={cap:g} per run ([privacy] max_epsilon_per_run), "
            f"the run asks for target-epsilon={instructions.target_epsilon:g}",
            rule="privacy.max_epsilon_per_run",
        )


def check_spend(ledger: PrivacyLedger, policy: SitePolicy, run_id: str) -> None:
    """Before any data is read: refuse when the budget or the run's cap is already spent."""
    scope = policy.budget_scope
    budget, cap = policy.epsilon_budget, policy.max_epsilon_per_run
    if budget is not None and (spent := ledger.spent(scope)) >= budget:
        raise PolicyViolation(
            f"the site's ε budget is spent: ε={spent:.4f} of {budget:.4f} "
            "([privacy] epsilon_budget); remaining budget 0",
            rule="privacy.epsilon_budget",
        )
    if cap is not None and (run_spent := ledger.spent(scope, run_id=run_id)) >= cap:
        raise PolicyViolation(
            f"this run has spent ε={run_spent:.4f} of the {cap:g} the site allows per run "
            "([privacy] max_epsilon_per_run)",
            rule="privacy.max_epsilon_per_run",
        )


def _check_noise_floor(sigma: float, policy: SitePolicy) -> None:
    floor = policy.min_noise_multiplier
    if floor is not None and sigma < floor:
        raise PolicyViolation(
            f"site policy requires a noise multiplier of at least {floor:g} "
            f"([privacy] min_noise_multiplier), the run would train with {sigma:.4g}",
            rule="privacy.min_noise_multiplier",
        )


def _delta(ledger: PrivacyLedger, instructions: RoundInstructions, scope: str, num_train: int) -> float:
    """δ is fixed by the first DP round in the site's budget scope."""
    recorded = ledger.delta(scope)
    if recorded is not None:
        return recorded
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
    ledger: PrivacyLedger,
    run_id: str,
    device: torch.device,
) -> DPRoundResult:
    """DP-SGD for the round's local epochs, within the site's floors, caps and ε budget, recorded
    in its ledger (in the policy's budget scope)."""
    scope = policy.budget_scope
    n = len(images)
    delta = _delta(ledger, instructions, scope, n)
    rate = poisson_sample_rate(n, instructions.batch_size)
    steps = instructions.local_epochs * steps_per_epoch(rate)
    sigma = instructions.noise_multiplier
    if instructions.target_epsilon > 0:  # ε for the whole run: spread over all its rounds
        sigma = noise_for_target_epsilon(
            target_epsilon=instructions.target_epsilon, delta=delta, sample_rate=rate,
            steps=steps * max(instructions.num_rounds, 1), accountant="rdp",
        )
    _check_noise_floor(sigma, policy)
    if policy.epsilon_budget is not None:
        ledger.check_budget(scope, budget=policy.epsilon_budget, delta=delta,
                            noise_multiplier=sigma, sample_rate=rate, steps=steps)
    cap = policy.max_epsilon_per_run
    if cap is not None and (run_eps := ledger.projected(scope, delta, sigma, rate, steps,
                                                        run_id=run_id)) > cap:
        raise PolicyViolation(
            f"this round would take the run's ε to {run_eps:.4f}, above the {cap:g} the site "
            "allows per run ([privacy] max_epsilon_per_run)",
            rule="privacy.max_epsilon_per_run",
        )
    config = DPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=instructions.max_grad_norm,
                      delta=delta)
    result = make_private_training(
        net, images, masks, config=config, batch_size=instructions.batch_size,
        epochs=instructions.local_epochs, learning_rate=instructions.learning_rate,
        device=device, seed=None,
    )
    ledger.record(scope, run_id=run_id, round=instructions.server_round,
                  noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                  steps=result.steps, delta=result.delta,
                  consortium=instructions.consortium, model=instructions.model_name)
    epsilon = ledger.spent(scope, result.delta)
    log.info("site %s round %d: DP-SGD sigma %.3f, %d steps, epsilon spent %.3f (delta %.2g)",
             site.name, instructions.server_round, result.noise_multiplier, result.steps, epsilon,
             result.delta)
    return DPRoundResult(result.loss, result.num_examples, result.steps, result.noise_multiplier,
                         result.delta, epsilon)
