"""Choosing a Flower strategy from typed settings.

Every strategy is Flower's own class from :mod:`flwr.serverapp.strategy`, built with the run's
settings; nothing here re-implements an aggregation rule. The settings refuse, at construction,
combinations that cannot work and name the conflict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from imaging.replies import NUM_EXAMPLES

from .errors import StrategyConfigError

__all__ = [
    "StrategySettings",
    "build_strategy",
    "STRATEGIES",
    "MEAN_STRATEGIES",
    "FEDOPT_STRATEGIES",
    "ROBUST_STRATEGIES",
    "WEIGHT_KEY",
    "PROXIMAL_MU_KEY",
]

log = logging.getLogger("fedseg.aggregation")

WEIGHT_KEY = NUM_EXAMPLES  # FedAvg's weight, as the reply contract names it
# The train-config key Flower's FedProx.configure_train writes (flwr 1.41.0, fedprox.py).
PROXIMAL_MU_KEY = "proximal-mu"

_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}
STRATEGIES = tuple(_CLASSES)
# Server side is a (weighted) mean of the replies: the aggregation client-level DP is calibrated for.
MEAN_STRATEGIES = ("fedavg", "fedprox")
FEDOPT_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
_TAKES_MALICIOUS = ("krum", "multikrum", "bulyan")
_FEDOPT_KNOBS = ("eta", "eta_l", "beta_1", "beta_2", "tau")


@dataclass(frozen=True)
class StrategySettings:
    """Which Flower strategy aggregates the sites' updates, and how.

    Parameters
    ----------
    name : str
        One of :data:`STRATEGIES`.
    fraction_train : float
        Fraction of connected sites sampled each round, in (0, 1].
    min_sites : int
        Sites sampled (and required) each round, at least; Flower's ``min_*_nodes``.
    client_dp, client_dp_noise, client_dp_clip
        Flower's server-side fixed clipping (client-level DP) around the strategy; mean
        aggregators only.
    proximal_mu : float
        FedProx's proximal weight (>= 0), sent to sites as ``"proximal-mu"``.
    eta, eta_l, beta_1, beta_2, tau : float or None
        FedAdam / FedYogi / FedAdagrad knobs; ``None`` keeps Flower's default for the class
        (they differ: FedYogi uses ``eta=1e-2, eta_l=0.0316``). FedAdagrad has no betas.
    trim_beta : float
        FedTrimmedAvg's cut fraction per tail, in (0, 0.5).
    num_malicious : int
        Byzantine sites to tolerate. Passed to Krum, MultiKrum and Bulyan as
        ``num_malicious_nodes``; for FedMedian and FedTrimmedAvg it only enters the
        configuration check; the mean and FedOpt strategies tolerate none.
    num_krum_select : int or None
        MultiKrum's ``num_nodes_to_select``; ``None`` selects ``min_sites - num_malicious``.
    keep_norm_local : bool
        FedBN-style: sites keep their own normalisation parameters (see
        :func:`aggregation.norm_layers.norm_parameter_names`).
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 2
    client_dp: bool = False  # Flower's server-side fixed clipping: client-level DP
    client_dp_noise: float = 0.1
    client_dp_clip: float = 10.0
    proximal_mu: float = 0.0
    eta: float | None = None
    eta_l: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    trim_beta: float = 0.2
    num_malicious: int = 0
    num_krum_select: int | None = None
    keep_norm_local: bool = False

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise StrategyConfigError(
                f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if not 0 < self.fraction_train <= 1:
            raise StrategyConfigError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        if self.min_sites < 1:
            raise StrategyConfigError(f"min-sites must be >= 1, got {self.min_sites}")
        check_strategy_settings(self)
        if self.client_dp:
            check_client_dp(self)

    @property
    def krum_select(self) -> int:
        """MultiKrum's ``num_nodes_to_select`` (the configured one, or the honest count)."""
        if self.num_krum_select is not None:
            return self.num_krum_select
        return max(1, self.min_sites - self.num_malicious)

    def params(self) -> dict[str, Any]:
        """The settings that shape this strategy, for lineage and experiment tracking."""
        out: dict[str, Any] = {"fraction_train": self.fraction_train, "min_sites": self.min_sites}
        if self.name == "fedprox":
            out["proximal_mu"] = self.proximal_mu
        if self.name in FEDOPT_STRATEGIES:
            out.update(_fedopt_kwargs(self))
        if self.name == "fedtrimmedavg":
            out["trim_beta"] = self.trim_beta
        if self.name in ROBUST_STRATEGIES:
            out["num_malicious"] = self.num_malicious
        if self.name == "multikrum":
            out["num_krum_select"] = self.krum_select
        if self.keep_norm_local:
            out["keep_norm_local"] = True
        return out


def check_strategy_settings(s: StrategySettings) -> None:
    """Refuse knobs given to a strategy that ignores them, and set-ups that cannot work."""
    if s.proximal_mu < 0:
        raise StrategyConfigError(f"proximal-mu must be >= 0, got {s.proximal_mu}")
    if s.proximal_mu > 0 and s.name != "fedprox":
        raise StrategyConfigError(
            f"proximal-mu={s.proximal_mu} is a FedProx setting, but strategy is {s.name!r}"
        )
    _check_fedopt(s)
    if not 0 < s.trim_beta < 0.5:
        raise StrategyConfigError(f"trim-beta must lie in (0, 0.5), got {s.trim_beta}")
    if s.num_malicious < 0:
        raise StrategyConfigError(f"num-malicious must be >= 0, got {s.num_malicious}")
    if s.num_malicious > 0 and s.name not in ROBUST_STRATEGIES:
        raise StrategyConfigError(
            f"num-malicious={s.num_malicious} needs a robust strategy "
            f"({', '.join(ROBUST_STRATEGIES)}); {s.name!r} averages every reply and tolerates none"
        )
    if s.num_krum_select is not None and s.name != "multikrum":
        raise StrategyConfigError(
            f"num-krum-select is a MultiKrum setting, but strategy is {s.name!r}"
        )
    _check_robust(s)


def _check_fedopt(s: StrategySettings) -> None:
    given = {k: getattr(s, k) for k in _FEDOPT_KNOBS if getattr(s, k) is not None}
    if given and s.name not in FEDOPT_STRATEGIES:
        raise StrategyConfigError(
            f"{', '.join(k.replace('_', '-') for k in given)} are FedOpt settings "
            f"({', '.join(FEDOPT_STRATEGIES)}), but strategy is {s.name!r}"
        )
    if s.name == "fedadagrad" and (s.beta_1 is not None or s.beta_2 is not None):
        raise StrategyConfigError("fedadagrad takes no beta-1 / beta-2 (Flower fixes both at 0)")
    for key in ("eta", "eta_l", "tau"):
        value = given.get(key)
        if value is not None and not value > 0:
            raise StrategyConfigError(f"{key.replace('_', '-')} must be > 0, got {value}")
    for key in ("beta_1", "beta_2"):
        value = given.get(key)
        if value is not None and not 0 <= value < 1:
            raise StrategyConfigError(f"{key.replace('_', '-')} must lie in [0, 1), got {value}")


def _check_robust(s: StrategySettings) -> None:
    """Each robust rule's own requirement on the number of replies, checked against min-sites."""
    n, f = s.min_sites, s.num_malicious
    if s.name in ("krum", "multikrum") and n < 2 * f + 3:
        raise StrategyConfigError(
            f"{s.name} with num-malicious={f} needs min-sites >= 2*f+3 = {2 * f + 3} "
            f"(Blanchard et al.: n > 2f+2), got min-sites={n}"
        )
    if s.name == "multikrum" and not 1 <= s.krum_select <= n - f:
        raise StrategyConfigError(
            f"num-krum-select must lie in [1, min-sites - num-malicious] = [1, {n - f}], "
            f"got {s.krum_select}"
        )
    if s.name == "bulyan" and n < 4 * f + 3:
        raise StrategyConfigError(
            f"bulyan with num-malicious={f} needs min-sites >= 4*f+3 = {4 * f + 3} "
            f"(Flower skips every round with fewer replies), got min-sites={n}"
        )
    if s.name == "fedmedian" and n <= 2 * f:
        raise StrategyConfigError(
            f"fedmedian tolerates fewer than half the sites: num-malicious={f} needs "
            f"min-sites >= {2 * f + 1}, got min-sites={n}"
        )
    if s.name == "fedtrimmedavg":
        cut = int(s.trim_beta * n)
        if cut < f:
            raise StrategyConfigError(
                f"fedtrimmedavg with trim-beta={s.trim_beta} cuts {cut} site(s) per tail at "
                f"min-sites={n}, fewer than num-malicious={f}"
            )
        if f == 0 and cut == 0:
            log.warning(
                "fedtrimmedavg with trim-beta=%s and %d site(s) trims nothing: it is an "
                "unweighted mean", s.trim_beta, n,
            )


def check_client_dp(settings: StrategySettings) -> None:
    """Refuse client-level DP set-ups whose accounting would not hold.

    Flower's wrapper clips each update to ``clip`` and adds noise of std
    ``noise * clip / min-sites`` to what the inner strategy returns: that calibration is the
    sensitivity of a mean of ``min-sites`` clipped updates. It does not hold for a median, a
    trimmed mean, a Krum selection (one site's update, sensitivity ``clip``) or a FedOpt step
    (Adam-style normalisation rescales the mean). Flower's wrapper also assumes ``min-sites``
    sampled sites every round, and discards the whole round when one reply fails.
    """
    if settings.name not in MEAN_STRATEGIES:
        kind = "robust" if settings.name in ROBUST_STRATEGIES else "adaptive-optimizer"
        raise StrategyConfigError(
            f"client-dp=true cannot wrap the {kind} strategy {settings.name!r}: Flower's DP "
            "wrapper calibrates its noise (noise-multiplier x clip / min-sites) to a mean of "
            f"the clipped updates; use one of {', '.join(MEAN_STRATEGIES)}"
        )
    if settings.fraction_train != 1.0:
        raise StrategyConfigError(
            "client-dp=true needs fraction-train=1.0: Flower's DP wrapper accounts for a fixed "
            "number of sampled sites (min-sites) every round"
        )
    if settings.client_dp_noise <= 0 or settings.client_dp_clip <= 0:
        raise StrategyConfigError("client-dp-noise and client-dp-clip must be > 0")
    log.warning(
        "client-level DP with %d site(s): the noise is calibrated to one whole site's update, so "
        "with few sites it either drowns the model or gives a weak guarantee; a round in which any "
        "site fails or refuses is discarded by the wrapper", settings.min_sites,
    )


def _fedopt_kwargs(s: StrategySettings) -> dict[str, float]:
    return {k: getattr(s, k) for k in _FEDOPT_KNOBS if getattr(s, k) is not None}


def _sampling(s: StrategySettings) -> dict[str, Any]:
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": s.min_sites,
        "min_evaluate_nodes": s.min_sites,
        "min_available_nodes": s.min_sites,
        "weighted_by_key": WEIGHT_KEY,
    }


_EXTRA: Mapping[str, Callable[[StrategySettings], dict[str, Any]]] = {
    "fedprox": lambda s: {"proximal_mu": s.proximal_mu},
    "fedadam": _fedopt_kwargs,
    "fedyogi": _fedopt_kwargs,
    "fedadagrad": _fedopt_kwargs,
    "fedtrimmedavg": lambda s: {"beta": s.trim_beta},
    "krum": lambda s: {"num_malicious_nodes": s.num_malicious},
    "multikrum": lambda s: {"num_malicious_nodes": s.num_malicious,
                            "num_nodes_to_select": s.krum_select},
    "bulyan": lambda s: {"num_malicious_nodes": s.num_malicious},
}


def build_strategy(settings: StrategySettings) -> Strategy:
    """Flower's own strategy class for ``settings.name``, weighted by ``num-examples``, and
    wrapped in Flower's client-level DP when asked.

    FedMedian, FedTrimmedAvg, Krum and Bulyan use the weight for metrics only (their array rule
    is unweighted by construction); MultiKrum weights the mean of the selected updates.
    """
    cls = _CLASSES[settings.name]
    extra = _EXTRA.get(settings.name, lambda s: {})(settings)
    strategy: Strategy = cls(**_sampling(settings), **extra)
    if settings.client_dp:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=settings.client_dp_noise,
            clipping_norm=settings.client_dp_clip,
            num_sampled_clients=settings.min_sites,
        )
    return strategy
