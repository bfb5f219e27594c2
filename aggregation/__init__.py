"""Choosing, composing and reporting Flower strategies."""

from .errors import AggregationError, StrategyConfigError
from .factory import (
    FEDOPT_STRATEGIES,
    MEAN_STRATEGIES,
    PROXIMAL_MU_KEY,
    ROBUST_STRATEGIES,
    STRATEGIES,
    WEIGHT_KEY,
    StrategySettings,
    build_strategy,
)
from .identity import SiteIdentities, trust_statement
from .reporting import RoundReport, SiteReportingStrategy
from .site_metrics import (
    SiteMetrics,
    site_metrics,
    summarize_evaluation,
    uncounted_sites,
)
from .norm_layers import norm_parameter_names, split_norm
from .quorum import QuorumNotReachedError, QuorumStrategy
from .validation import Rejection, ValidatingStrategy
from .screening import ScreeningStrategy, ScreenSettings, UpdateScore
from .resume import OnRoundEnd, ResumingStrategy
from .retry import RoundBelowMinimumError, RoundRetryStrategy
from .state import restore_strategy_state, strategy_state

__all__ = [
    "AggregationError",
    "StrategyConfigError",
    "STRATEGIES",
    "StrategySettings",
    "build_strategy",
    "SiteIdentities",
    "trust_statement",
    "RoundReport",
    "SiteReportingStrategy",
    "SiteMetrics",
    "site_metrics",
    "summarize_evaluation",
    "uncounted_sites",
    "FEDOPT_STRATEGIES",
    "MEAN_STRATEGIES",
    "PROXIMAL_MU_KEY",
    "ROBUST_STRATEGIES",
    "WEIGHT_KEY",
    "norm_parameter_names",
    "split_norm",
    "Rejection",
    "ValidatingStrategy",
    "ScreeningStrategy",
    "ScreenSettings",
    "UpdateScore",
    "QuorumStrategy",
    "QuorumNotReachedError",
    "OnRoundEnd",
    "ResumingStrategy",
    "RoundBelowMinimumError",
    "RoundRetryStrategy",
    "restore_strategy_state",
    "strategy_state",
]
