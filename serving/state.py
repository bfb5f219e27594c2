"""What the running service holds: the predictor, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelNotReadyError
from .predictor import Predictor

__all__ = ["ModelState"]


@dataclass
class ModelState:
    """The loaded model of one app (kept in ``app.state.model``).

    Attributes
    ----------
    model_uri : str
        The URI the service was asked to serve.
    predictor : Predictor or None
        Set once loading succeeded.
    reason : str
        Why there is no predictor (loading, or the loading error).
    """

    model_uri: str
    predictor: Predictor | None = None
    reason: str = "the model is still loading"

    def require(self) -> Predictor:
        """The predictor, or :class:`ModelNotReadyError` with the reason."""
        if self.predictor is None:
            raise ModelNotReadyError(f"model {self.model_uri} is not ready: {self.reason}")
        return self.predictor
