"""Choosing, composing and reporting Flower strategies."""

from .errors import AggregationError, StrategyConfigError
from .factory import STRATEGIES, StrategySettings, build_strategy
from .reporting import RoundReport, SiteReportingStrategy
from .site_metrics import SiteMetrics, site_metrics, summarize_evaluation

__all__ = [
    "AggregationError",
    "StrategyConfigError",
    "STRATEGIES",
    "StrategySettings",
    "build_strategy",
    "RoundReport",
    "SiteReportingStrategy",
    "SiteMetrics",
    "site_metrics",
    "summarize_evaluation",
]
