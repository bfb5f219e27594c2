"""fedseg privacy: DP-SGD with Opacus, and the per-site privacy ledger.

Opacus is imported only here, and only when a name that needs it is first used. The public
surface:

- :class:`DPConfig`: typed DP settings (σ or target ε, clipping norm, δ, accountant).
- :func:`make_private_training`: train the U-Net in place with DP-SGD (Poisson sampling,
  per-sample clipping, Gaussian noise) and report what the ledger needs (:class:`DPTrainResult`).
- :class:`PrivacyLedger`: the durable per-site record of every DP training, hash-chained and
  anchored through a :class:`LedgerAnchor`; ε recomposed per budget scope of the site (never
  per consortium or model), budget checks before a round.
- The exception tree rooted at :class:`PrivacyError`.
"""

from importlib import import_module
from typing import Any

from .config import Accountant, DPConfig, default_delta
from .errors import (
    BudgetExceededError,
    LedgerError,
    LedgerIntegrityError,
    PrivacyConfigError,
    PrivacyError,
)

# Loaded on first use: Opacus calls logging.basicConfig() when imported, which would take the
# coordinator's log lines off stdout (server.app), and the coordinator and `fedseg pki` need
# only enrolment and keys, not Opacus.
_LAZY = {
    **dict.fromkeys(("compose_epsilon", "noise_for_target_epsilon", "poisson_sample_rate",
                     "steps_per_epoch"), ".accounting"),
    **dict.fromkeys(("DPTrainResult", "make_private_training", "per_sample_loss", "validate_module"),
                    ".dpsgd"),
    **dict.fromkeys(("DEFAULT_SCOPE", "LedgerAnchor", "LedgerEntry", "LedgerHead", "LedgerReport",
                     "PrivacyLedger", "verify_ledger"), ".ledger"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Accountant",
    "DEFAULT_SCOPE",
    "BudgetExceededError",
    "DPConfig",
    "DPTrainResult",
    "LedgerAnchor",
    "LedgerEntry",
    "LedgerError",
    "LedgerHead",
    "LedgerIntegrityError",
    "LedgerReport",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacyLedger",
    "compose_epsilon",
    "default_delta",
    "make_private_training",
    "noise_for_target_epsilon",
    "per_sample_loss",
    "poisson_sample_rate",
    "steps_per_epoch",
    "validate_module",
    "verify_ledger",
]
