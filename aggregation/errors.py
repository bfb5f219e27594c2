"""The aggregation package's exception tree."""

from __future__ import annotations

__all__ = ["AggregationError", "StrategyConfigError"]


class AggregationError(Exception):
    """Base class of every error raised by :mod:`aggregation`."""


class StrategyConfigError(AggregationError, ValueError):
    """The strategy named in the run config does not exist or is misconfigured."""
