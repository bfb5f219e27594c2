"""The privacy package's exception tree.

Every error raised on purpose by :mod:`privacy` derives from :class:`PrivacyError`.
"""

from __future__ import annotations

__all__ = [
    "PrivacyError",
    "PrivacyConfigError",
    "BudgetExceededError",
    "LedgerError",
    "LedgerIntegrityError",
    "PkiError",
    "EnrolmentError",
]


class PrivacyError(Exception):
    """Base class of every error raised by :mod:`privacy`."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A differential-privacy setting is missing, contradictory or out of range,
    or the network cannot be trained with DP-SGD."""


class BudgetExceededError(PrivacyError):
    """The next round would take a site's cumulative ε above its budget.

    Parameters
    ----------
    spent : float
        ε already spent by the site (all recorded rounds, one accountant).
    projected : float
        ε the site would have spent after the proposed round.
    budget : float
        The site's ε budget.
    delta : float
        The δ at which all three are expressed.
    """

    def __init__(self, *, spent: float, projected: float, budget: float, delta: float) -> None:
        self.spent = spent
        self.projected = projected
        self.budget = budget
        self.delta = delta
        self.remaining = max(budget - spent, 0.0)
        super().__init__(
            f"round would spend ε={projected:.4f} > budget {budget:.4f}; "
            f"remaining budget {self.remaining:.4f} (already spent ε={spent:.4f} at δ={delta:g})"
        )


class LedgerError(PrivacyError):
    """The privacy ledger cannot be read, written or composed (corrupt file, mixed δ...)."""


class LedgerIntegrityError(LedgerError):
    """The ledger's hash chain is broken, or it lost a head anchored outside it (deleted,
    truncated, rolled back or rewritten): it is refused, never reset. The message holds no path."""


class PkiError(PrivacyError):
    """A key or certificate cannot be created, read or used (missing CA, wrong format, a file
    that would be overwritten without ``force``)."""


class EnrolmentError(PkiError):
    """A site's enrolment (signed manifest, node key) cannot be made, read or admitted: a bad or
    edited signature, a key other than the registered one, a name or key enrolled twice."""
