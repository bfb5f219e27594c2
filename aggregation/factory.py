"""Choosing a Flower strategy from typed settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from .errors import StrategyConfigError

__all__ = ["StrategySettings", "build_strategy", "STRATEGIES"]

log = logging.getLogger("fedseg.aggregation")

STRATEGIES = ("fedavg",)


@dataclass(frozen=True)
class StrategySettings:
    name: str = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 2
    client_dp: bool = False  # Flower's server-side fixed clipping: client-level DP
    client_dp_noise: float = 0.1
    client_dp_clip: float = 10.0

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise StrategyConfigError(
                f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if not 0 < self.fraction_train <= 1:
            raise StrategyConfigError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        if self.min_sites < 1:
            raise StrategyConfigError(f"min-sites must be >= 1, got {self.min_sites}")
        if self.client_dp:
            check_client_dp(self)


def check_client_dp(settings: StrategySettings) -> None:
    """Refuse client-level DP set-ups whose accounting would not hold.

    Flower's wrapper assumes ``min-sites`` sampled sites every round, and it discards the whole
    round when one reply fails.
    """
    if settings.fraction_train != 1.0:
        raise StrategyConfigError(
            "client-dp=true needs fraction-train=1.0: Flower's DP wrapper accounts for a fixed "
            "number of sampled sites (min-sites) every round"
        )
    if settings.client_dp_noise <= 0 or settings.client_dp_clip <= 0:
        raise StrategyConfigError("client-dp-noise and client-dp-clip must be > 0")
    log.warning(
        "client-level DP with %d site(s): the noise is calibrated to one whole site's update, so "
        "with few sites it either drowns the model or gives a weak guarantee; a round in which any "
        "site fails or refuses is discarded by the wrapper", settings.min_sites,
    )

def build_strategy(settings: StrategySettings) -> Strategy:
    """Flower's own strategy class for ``settings.name``, weighted by samples, and wrapped in
    Flower's client-level DP when asked."""
    strategy: Strategy = FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_sites,
        min_evaluate_nodes=settings.min_sites,
        min_available_nodes=settings.min_sites,
        weighted_by_key="num-examples",
    )
    if settings.client_dp:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=settings.client_dp_noise,
            clipping_norm=settings.client_dp_clip,
            num_sampled_clients=settings.min_sites,
        )
    return strategy
