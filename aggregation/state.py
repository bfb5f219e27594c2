"""The state a strategy carries between rounds, for the coordinator's journal.

Our wrappers are stateless between rounds; of Flower's strategies only the FedOpt family
(FedAdam, FedYogi, FedAdagrad) keeps state: the first and second moments ``m_t`` and ``v_t``.
Everything is walked through the ``inner`` (ours) and ``strategy`` (Flower's DP wrappers) links.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

__all__ = ["strategy_state", "restore_strategy_state"]

_MOMENTS = ("m_t", "v_t")


def _chain(strategy: Strategy) -> Iterator[Strategy]:
    seen: set[int] = set()
    current: object | None = strategy
    while isinstance(current, Strategy) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "inner", None) or getattr(current, "strategy", None)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """``{"m_t": {key: array}, ...}`` of the FedOpt strategy in the stack; empty otherwise."""
    for layer in _chain(strategy):
        if isinstance(layer, FedOpt):
            return {name: {k: np.array(v, copy=True) for k, v in getattr(layer, name).items()}
                    for name in _MOMENTS if getattr(layer, name) is not None}
    return {}


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Put journaled moments back; refuse state that does not belong to this stack."""
    if not state:
        return
    for layer in _chain(strategy):
        if isinstance(layer, FedOpt):
            unknown = set(state) - set(_MOMENTS)
            if unknown:
                raise ValueError(f"unknown strategy state {sorted(unknown)}")
            for name, arrays in state.items():
                setattr(layer, name, {k: np.asarray(v) for k, v in arrays.items()})
            return
    raise ValueError(f"journal holds strategy state {sorted(state)} but {type(strategy).__name__} "
                     "wraps no FedOpt strategy")
