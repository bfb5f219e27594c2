"""The simulation package's exception tree."""

from __future__ import annotations

__all__ = ["SimulationError", "SitesDirError", "AppConfigError"]


class SimulationError(Exception):
    """Base class of every error raised by :mod:`simulation`."""


class SitesDirError(SimulationError, ValueError):
    """The sites folder is missing, empty, or holds too few sites."""


class AppConfigError(SimulationError, ValueError):
    """The Flower app's pyproject.toml cannot be found, or an override key is unknown."""
