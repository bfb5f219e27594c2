"""The Flower run config, parsed once at the ServerApp's edge into typed settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregation import ScreenSettings, StrategySettings
from imaging.errors import ConfigError
from imaging.instructions import RoundInstructions
from imaging.spec import ModelSpec

from .errors import RunConfigError

__all__ = ["FederationConfig"]


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in ("true", "1", "yes"):
        return True
    if str(raw).lower() in ("false", "0", "no"):
        return False
    raise RunConfigError(f"expected true or false, got {raw!r}")


def _channels(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in str(raw).split(",") if c.strip())
    except ValueError as exc:
        raise RunConfigError(f"unet-channels must be comma-separated integers, got {raw!r}") from exc


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int
    round_timeout: float
    update_norm_factor: float
    join_timeout: float
    model_name: str
    strategy: StrategySettings
    instructions: RoundInstructions
    round_retries: int = 1
    max_weight_share: float = 1.0  # of a round's total samples, per site; 1.0 caps nothing
    screen: ScreenSettings = field(default_factory=ScreenSettings)
    resume_run: str = ""  # a journaled run to continue after its last completed round
    run_config: dict[str, Any] = field(default_factory=dict, compare=False)  # as given, journaled

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Typed settings from ``[tool.flwr.app.config]`` fused with ``--run-config``."""
        get = _Getter(run_config)
        try:
            spec = ModelSpec(
                channels=_channels(get("unet-channels", str)),
                image_size=get("image-size", int),
            )
            instructions = RoundInstructions(
                spec=spec,
                local_epochs=get("local-epochs", int),
                batch_size=get("batch-size", int),
                learning_rate=get("learning-rate", float),
                seed=get("seed", int),
                test_fraction=get("test-fraction", float),
                num_rounds=get("num-server-rounds", int),
                model_name=get("model-name", str),
                consortium=get("consortium", str),
                dp=get("dp", _bool),
                noise_multiplier=get("noise-multiplier", float),
                target_epsilon=get("target-epsilon", float),
                max_grad_norm=get("max-grad-norm", float),
                delta=get("dp-delta", float),
                local_norm=get("local-norm", _bool),
            )
            strategy = StrategySettings(
                name=get("strategy", str).lower(),
                fraction_train=get("fraction-train", float),
                min_sites=get("min-sites", int),
                client_dp=get("client-dp", _bool),
                client_dp_noise=get("client-dp-noise", float),
                client_dp_clip=get("client-dp-clip", float),
                proximal_mu=get("proximal-mu", float),
                trim_beta=get("trim-beta", float),
                num_malicious=get("num-malicious", int),
            )
            screen = ScreenSettings(
                enabled=get("screen-updates", _bool),
                min_cosine=get("screen-min-cosine", float),
                max_norm_ratio=get("screen-max-norm-ratio", float),
            )
        except (ConfigError, ValueError) as exc:
            raise RunConfigError(f"invalid run config: {exc}") from exc
        num_rounds = get("num-server-rounds", int)
        if num_rounds < 1:
            raise RunConfigError(f"num-server-rounds must be >= 1, got {num_rounds}")
        norm_factor = get("update-norm-factor", float)
        if norm_factor <= 1:
            raise RunConfigError(f"update-norm-factor must be > 1, got {norm_factor}")
        join_timeout = get("join-timeout", float)
        if join_timeout <= 0:
            raise RunConfigError(f"join-timeout must be > 0 seconds, got {join_timeout}")
        timeout = get("round-timeout", float)
        if timeout <= 0:
            raise RunConfigError(f"round-timeout must be > 0 seconds, got {timeout}")
        retries = get("round-retries", int)
        if retries < 0:
            raise RunConfigError(f"round-retries must be >= 0, got {retries}")
        share = get("max-weight-share", float)
        if not (0 < share <= 1 and (share == 1 or share * strategy.min_sites > 1)):
            raise RunConfigError(
                f"max-weight-share must lie in (1/min-sites, 1] = ({1 / strategy.min_sites:.3g}, 1], got {share}: "
                "below 1/min-sites even equal sites would all be refused"
            )
        return cls(
            num_rounds=num_rounds,
            round_timeout=timeout,
            update_norm_factor=norm_factor,
            join_timeout=join_timeout,
            model_name=get("model-name", str),
            strategy=strategy,
            instructions=instructions,
            round_retries=retries,
            max_weight_share=share,
            screen=screen,
            resume_run=get("resume-run", str).strip(),
            run_config=dict(run_config),
        )

    def as_params(self) -> dict[str, object]:
        """Flat parameters for experiment tracking."""
        i = self.instructions
        return {
            "num-server-rounds": self.num_rounds,
            "round-timeout": self.round_timeout,
            "join-timeout": self.join_timeout,
            "round-retries": self.round_retries,
            "model-name": self.model_name,
            "strategy": self.strategy.name,
            **{f"strategy.{k}": v for k, v in self.strategy.params().items()},
            "update-norm-factor": self.update_norm_factor,
            "max-weight-share": self.max_weight_share,
            "screen-updates": self.screen.enabled,
            "screen-min-cosine": self.screen.min_cosine,
            "screen-max-norm-ratio": self.screen.max_norm_ratio,
            "fraction-train": self.strategy.fraction_train,
            "min-sites": self.strategy.min_sites,
            "local-epochs": i.local_epochs,
            "batch-size": i.batch_size,
            "learning-rate": i.learning_rate,
            "seed": i.seed,
            "test-fraction": i.test_fraction,
            "image-size": i.spec.image_size,
            "unet-channels": ",".join(map(str, i.spec.channels)),
            "norm": i.spec.norm,
            "consortium": i.consortium,
            "dp": i.dp,
            "noise-multiplier": i.noise_multiplier,
            "target-epsilon": i.target_epsilon,
            "max-grad-norm": i.max_grad_norm,
            "dp-delta": i.delta,
            "local-norm": i.local_norm,
            "client-dp": self.strategy.client_dp,
            "client-dp-noise": self.strategy.client_dp_noise,
            "client-dp-clip": self.strategy.client_dp_clip,
        }


class _Getter:
    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def __call__(self, key: str, kind: type) -> Any:
        if key not in self.config:
            raise RunConfigError(f"run config lacks {key!r} (see [tool.flwr.app.config])")
        value = self.config[key]
        try:
            return kind(value)
        except RunConfigError as exc:
            raise RunConfigError(f"run config {key}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RunConfigError(f"run config {key}={value!r} is not a {kind.__name__}") from exc
