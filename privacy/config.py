"""Typed differential-privacy settings of a site's local training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from .errors import PrivacyConfigError

__all__ = ["DPConfig", "Accountant", "default_delta"]

Accountant = Literal["rdp", "prv"]
_ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)


def default_delta(num_samples: int) -> float:
    """The default δ for ``num_samples`` training samples: ``min(1e-5, 1 / (10 N))``.

    Well below ``1 / N``, the probability at which DP-SGD could leak one whole record.
    """
    if num_samples <= 0:
        raise PrivacyConfigError(f"need at least one training sample, got N={num_samples}")
    return min(1e-5, 1.0 / (10 * num_samples))


def _finite_positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DPConfig:
    """How a site trains with DP-SGD (Opacus).

    Parameters
    ----------
    enabled : bool
        Train with DP-SGD. When ``False`` the other fields are still range-checked but unused.
    noise_multiplier : float or None
        σ: Gaussian noise std relative to ``max_grad_norm``. Exactly one of ``noise_multiplier``
        and ``target_epsilon`` must be set when ``enabled``.
    target_epsilon : float or None
        Choose σ so that *this round's* steps alone reach this ε at ``delta`` (Opacus'
        ``get_noise_multiplier``). What the site has already spent is the ledger's business
        (:class:`privacy.ledger.PrivacyLedger`), not this field's.
    max_grad_norm : float
        Per-sample gradient clipping norm C (> 0).
    delta : float or None
        δ of the guarantee. ``None``: :func:`default_delta` of the site's training samples.
        It must lie below ``1 / N`` (checked by :meth:`delta_for`).
    accountant : {"rdp", "prv"}
        Opacus accountant used to pick σ from ``target_epsilon`` and to report ε.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: Accountant = "rdp"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise PrivacyConfigError(f"enabled must be a bool, got {self.enabled!r}")
        _finite_positive("noise_multiplier", self.noise_multiplier)
        _finite_positive("target_epsilon", self.target_epsilon)
        _finite_positive("max_grad_norm", self.max_grad_norm)
        if self.delta is not None:
            _finite_positive("delta", self.delta)
            if self.delta >= 1:
                raise PrivacyConfigError(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.accountant not in _ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {list(_ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.enabled:
            both = self.noise_multiplier is not None and self.target_epsilon is not None
            neither = self.noise_multiplier is None and self.target_epsilon is None
            if both:
                raise PrivacyConfigError(
                    "give exactly one of noise_multiplier and target_epsilon, not both "
                    f"(got noise_multiplier={self.noise_multiplier}, "
                    f"target_epsilon={self.target_epsilon})"
                )
            if neither:
                raise PrivacyConfigError(
                    "DP-SGD is enabled but neither noise_multiplier nor target_epsilon is set: "
                    "give exactly one"
                )

    def delta_for(self, num_samples: int) -> float:
        """The δ to use for ``num_samples`` training samples, checked against ``1 / N``.

        Raises
        ------
        PrivacyConfigError
            If ``num_samples < 1`` or the configured δ is not below ``1 / N``.
        """
        if num_samples <= 0:
            raise PrivacyConfigError(f"need at least one training sample, got N={num_samples}")
        delta = default_delta(num_samples) if self.delta is None else float(self.delta)
        if delta >= 1.0 / num_samples:
            raise PrivacyConfigError(
                f"delta={delta:g} must be below 1/N = {1.0 / num_samples:g} for N={num_samples} "
                "training samples (a larger δ allows leaking a whole record)"
            )
        return delta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPConfig:
        """Build from a mapping with the field names; unknown keys are refused."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise PrivacyConfigError(f"unknown DP config keys: {sorted(unknown)}")
        return cls(**data)
