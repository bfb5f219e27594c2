"""What the running service holds for one role: the predictor, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelNotReadyError
from .predictor import Predictor

__all__ = ["ModelState"]


@dataclass
class ModelState:
    """The model serving one role (``champion`` or ``challenger``) of an app.

    :class:`serving.models.ModelManager` swaps ``predictor`` atomically when the registry moves the
    role's alias; a request keeps the predictor it started with. ``app.state.model`` is the
    champion's state.

    Attributes
    ----------
    model_uri : str
        The URI the role follows (``models:/NAME@ALIAS`` or a pinned ``models:/NAME/VERSION``).
    predictor : Predictor or None
        The version being served, once loading succeeded.
    reason : str
        Why there is no predictor (loading, the loading error, dropped).
    role : str
        ``"champion"`` or ``"challenger"``.
    last_error : str
        The last failed (re)load or registry check, kept while an older version serves.
    refused_version : int or None
        The version whose load failed last; not retried until the alias moves elsewhere.
    """

    model_uri: str
    predictor: Predictor | None = None
    reason: str = "the model is still loading"
    role: str = "champion"
    last_error: str = ""
    refused_version: int | None = None

    def require(self) -> Predictor:
        """The predictor, or :class:`ModelNotReadyError` with the reason."""
        predictor = self.predictor  # one read: a concurrent swap cannot split the check
        if predictor is None:
            raise ModelNotReadyError(f"model {self.model_uri} is not ready: {self.reason}")
        return predictor
