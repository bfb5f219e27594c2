"""Choosing a Flower strategy from typed settings."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedAvg, Strategy

from .errors import StrategyConfigError

__all__ = ["StrategySettings", "build_strategy", "STRATEGIES"]

STRATEGIES = ("fedavg",)


@dataclass(frozen=True)
class StrategySettings:
    name: str = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 2

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise StrategyConfigError(
                f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if not 0 < self.fraction_train <= 1:
            raise StrategyConfigError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        if self.min_sites < 1:
            raise StrategyConfigError(f"min-sites must be >= 1, got {self.min_sites}")


def build_strategy(settings: StrategySettings) -> Strategy:
    """Flower's own strategy class for ``settings.name``, weighted by samples."""
    return FedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_sites,
        min_evaluate_nodes=settings.min_sites,
        min_available_nodes=settings.min_sites,
        weighted_by_key="num-examples",
    )
