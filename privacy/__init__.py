"""fedseg privacy: DP-SGD with Opacus, and the per-site privacy ledger.

Opacus is imported only here. The public surface:

- :class:`DPConfig`: typed DP settings (σ or target ε, clipping norm, δ, accountant).
- :func:`make_private_training`: train the U-Net in place with DP-SGD (Poisson sampling,
  per-sample clipping, Gaussian noise) and report what the ledger needs (:class:`DPTrainResult`).
- :class:`PrivacyLedger`: the durable per-site record of every DP training, hash-chained and
  anchored through a :class:`LedgerAnchor`; ε recomposed per budget scope of the site (never
  per consortium or model), budget checks before a round.
- The exception tree rooted at :class:`PrivacyError`.
"""

from .accounting import compose_epsilon, noise_for_target_epsilon, poisson_sample_rate, steps_per_epoch
from .config import Accountant, DPConfig, default_delta
from .dpsgd import DPTrainResult, make_private_training, per_sample_loss, validate_module
from .errors import (
    BudgetExceededError,
    LedgerError,
    LedgerIntegrityError,
    PrivacyConfigError,
    PrivacyError,
)
from .ledger import (
    DEFAULT_SCOPE,
    LedgerAnchor,
    LedgerEntry,
    LedgerHead,
    LedgerReport,
    PrivacyLedger,
    verify_ledger,
)

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
