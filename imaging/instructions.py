"""What the coordinator asks a site to do each round: the typed form of the round config.

It travels as flat scalars (a Flower ConfigRecord) and is parsed here, once, on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .spec import ModelSpec

__all__ = ["RoundInstructions"]


def _get(config: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in config:
        raise ConfigError(f"round config lacks {key!r}")
    value = config[key]
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"round config {key!r}={value!r} is not a {kind.__name__}") from exc


@dataclass(frozen=True)
class RoundInstructions:
    """Local training and evaluation settings sent with every round."""

    spec: ModelSpec
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 42
    test_fraction: float = 0.25
    server_round: int = 0
    num_rounds: int = 1
    model_name: str = "fedseg-unet"
    consortium: str = "fedseg"
    # DP-SGD at the site (privacy/); 0 means "unset" for the numeric knobs
    dp: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0  # > 0: ε for the whole run at this site; wins over noise_multiplier
    max_grad_norm: float = 1.0
    delta: float = 0.0  # 0: below 1/N of the site's training samples
    proximal_mu: float = 0.0  # FedProx: sent by Flower's FedProx as "proximal-mu"
    local_norm: bool = False  # FedBN-style: each site keeps its own normalisation layers

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ConfigError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning-rate must lie in (0, 1), got {self.learning_rate}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"test-fraction must lie in [0, 1), got {self.test_fraction}")
        if self.dp:
            if self.noise_multiplier <= 0 and self.target_epsilon <= 0:
                raise ConfigError("dp=true needs noise-multiplier > 0 or target-epsilon > 0")
            if self.max_grad_norm <= 0:
                raise ConfigError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
            if not 0 <= self.delta < 1:
                raise ConfigError(f"dp-delta must lie in [0, 1), got {self.delta}")
            if self.proximal_mu > 0:
                raise ConfigError("FedProx's proximal term is not per-sample: it cannot be used with dp=true")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")

    def to_config(self) -> dict[str, int | float | str]:
        return {
            "model-spec": self.spec.to_json(),
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "seed": self.seed,
            "test-fraction": self.test_fraction,
            "num-rounds": self.num_rounds,
            "model-name": self.model_name,
            "consortium": self.consortium,
            "dp": self.dp,
            "noise-multiplier": self.noise_multiplier,
            "target-epsilon": self.target_epsilon,
            "max-grad-norm": self.max_grad_norm,
            "dp-delta": self.delta,
            "local-norm": self.local_norm,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstructions:
        return cls(
            spec=ModelSpec.from_json(_get(config, "model-spec", str)),
            local_epochs=_get(config, "local-epochs", int),
            batch_size=_get(config, "batch-size", int),
            learning_rate=_get(config, "learning-rate", float),
            seed=_get(config, "seed", int),
            test_fraction=_get(config, "test-fraction", float),
            server_round=int(config.get("server-round", 0)),
            num_rounds=int(config.get("num-rounds", 1)),
            model_name=str(config.get("model-name", "fedseg-unet")),
            consortium=str(config.get("consortium", "fedseg")),
            dp=bool(config.get("dp", False)),
            noise_multiplier=float(config.get("noise-multiplier", 0.0)),
            target_epsilon=float(config.get("target-epsilon", 0.0)),
            max_grad_norm=float(config.get("max-grad-norm", 1.0)),
            delta=float(config.get("dp-delta", 0.0)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            local_norm=bool(config.get("local-norm", False)),
        )
