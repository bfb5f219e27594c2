"""Pure privacy-accounting helpers over Opacus accountants.

A *history* is a sequence of ``(noise_multiplier, sample_rate, steps)`` triples, the format of
Opacus' ``RDPAccountant.history`` and ``PRVAccountant.history``: composing them in one fresh
accountant gives the ε of all of them together.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from .config import Accountant
from .errors import PrivacyConfigError

__all__ = [
    "Mechanism",
    "compose_epsilon",
    "noise_for_target_epsilon",
    "poisson_sample_rate",
    "steps_per_epoch",
]

Mechanism = tuple[float, float, int]


def poisson_sample_rate(num_samples: int, batch_size: int) -> float:
    """Opacus' Poisson sampling rate for ``num_samples`` and ``batch_size``.

    ``1 / ceil(N / B)``: what ``PrivacyEngine.make_private(poisson_sampling=True)`` uses
    (``1 / len(data_loader)``). It equals ``B / N`` when ``B`` divides ``N`` and is slightly
    below it otherwise.
    """
    if num_samples <= 0 or batch_size <= 0:
        raise PrivacyConfigError(
            f"need num_samples > 0 and batch_size > 0, got {num_samples} and {batch_size}"
        )
    return 1.0 / math.ceil(num_samples / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches per epoch, as Opacus' ``UniformWithReplacementSampler`` counts them."""
    return int(1 / sample_rate)


def compose_epsilon(history: Iterable[Mechanism], *, delta: float, accountant: Accountant) -> float:
    """ε of all mechanisms in ``history`` composed by one fresh Opacus accountant at ``delta``."""
    acc = create_accountant(mechanism=accountant)
    for noise_multiplier, sample_rate, steps in history:
        if steps > 0:
            acc.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def noise_for_target_epsilon(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: Accountant
) -> float:
    """σ such that ``steps`` Poisson-subsampled Gaussian steps spend at most ``target_epsilon``."""
    try:
        with warnings.catch_warnings():
            # The binary search probes huge σ, whose best RDP order is the largest one.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        return float(sigma)
    except ValueError as exc:
        raise PrivacyConfigError(
            f"no noise multiplier reaches target_epsilon={target_epsilon} at delta={delta:g} "
            f"over {steps} steps at sample rate {sample_rate:g}: {exc}"
        ) from exc
