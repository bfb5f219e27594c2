"""Promotion gates: what a registered version must show before it may become ``champion``.

Everything here is pure: :class:`VersionFacts` is read from a version's tags (strings), and
:func:`evaluate_gates` compares a candidate with the current champion under a
:class:`GateConfig`. Nothing talks to MLflow; :mod:`registry.promotion` does.

A gates file is TOML, with the keys at the top level or in a ``[gates]`` table::

    [gates]
    min_worst_site_dice = 0.6     # every evaluating site must reach this Dice
    max_worst_site_dice_drop = 0.02  # candidate's worst site >= champion's worst site - 0.02
    max_mean_dice_drop = 0.02     # candidate dice_mean >= champion dice_mean - 0.02
    max_epsilon = 8.0             # every site's DP epsilon must be <= 8 (omit: no epsilon gate)
    require_manifests = true      # every training site must have a data manifest digest

One gate is not configurable: ``evaluated_sites``, every site that trained the version must have
sent a Dice of the published model itself (``eval_sites``). A version that misses one is
promoted only by an operator's forced promotion with a recorded reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imaging.replies import DICE_COUNT_KEYS

from .errors import GateError
from .publish import DECISION_METRIC, METRIC_PREFIX

__all__ = [
    "GATES_FILE_ENV",
    "GateConfig",
    "GateResult",
    "VersionFacts",
    "evaluate_gates",
    "default_gates",
]

GATES_FILE_ENV = "FEDSEG_GATES_FILE"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOLERANCE = 1e-9  # metrics are stored with 6 significant digits; never fail on float noise


@dataclass(frozen=True)
class GateConfig:
    """Thresholds a candidate must meet to be promoted.

    Parameters
    ----------
    min_worst_site_dice : float, default 0.0
        Lowest acceptable Dice of the worst evaluating site (``metric.dice_min``, else the
        minimum of ``eval_sites``). 0.0 accepts any model.
    max_worst_site_dice_drop : float, default 0.02
        How far the candidate's worst site Dice may fall below the current champion's worst
        site Dice. Worst site first: a model that helps on average but hurts the weakest
        hospital is not promoted. Passes when there is no champion or it has no per-site Dice.
    max_mean_dice_drop : float, default 0.02
        How far the candidate's ``dice_mean`` may fall below the current champion's. Passes when
        there is no champion, or when the champion has no ``dice_mean``.
    max_epsilon : float or None, default None
        Largest acceptable differential-privacy epsilon of any training site. ``None`` disables
        the gate. When set, a version trained without DP, or without ``epsilon_sites`` for every
        site, fails: its epsilon is unbounded.
    require_manifests : bool, default False
        When true, every site in ``sites`` must have a SHA-256 digest in ``site_manifests``.

    Raises
    ------
    GateError
        A value has the wrong type or is out of range.
    """

    min_worst_site_dice: float = 0.0
    max_mean_dice_drop: float = 0.02
    max_epsilon: float | None = None
    require_manifests: bool = False
    max_worst_site_dice_drop: float = 0.02

    def __post_init__(self) -> None:
        _check_number("min_worst_site_dice", self.min_worst_site_dice, 0.0, 1.0)
        _check_number("max_worst_site_dice_drop", self.max_worst_site_dice_drop, 0.0, 1.0)
        _check_number("max_mean_dice_drop", self.max_mean_dice_drop, 0.0, 1.0)
        if self.max_epsilon is not None:
            _check_number("max_epsilon", self.max_epsilon, 0.0, math.inf)
            if self.max_epsilon <= 0:
                raise GateError(f"gate max_epsilon must be > 0, got {self.max_epsilon!r}")
        if not isinstance(self.require_manifests, bool):
            raise GateError(
                f"gate require_manifests must be true or false, got {self.require_manifests!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "gates") -> GateConfig:
        """Build from a mapping of gate names to values, refusing unknown keys.

        Parameters
        ----------
        values : Mapping[str, Any]
            Gate names (the field names of this class) to values.
        source : str
            Where the values come from, for error messages.

        Raises
        ------
        GateError
            An unknown key, a bad type or an out-of-range value, naming the key.
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise GateError(
                f"{source}: unknown gate key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(known)}"
            )
        try:
            return cls(**dict(values))
        except GateError as exc:
            raise GateError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> GateConfig:
        """Read gates from a TOML file: top-level keys, or a ``[gates]`` table.

        Raises
        ------
        GateError
            The file is missing, unreadable or not TOML, or holds an unknown key or a bad value.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise GateError(f"cannot read gates file {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise GateError(f"gates file {path} is not valid TOML: {exc}") from None
        if "gates" in data:
            table = data["gates"]
            if not isinstance(table, dict):
                raise GateError(f"gates file {path}: 'gates' must be a table")
            others = sorted(k for k in data if k != "gates")
            if others:
                raise GateError(
                    f"gates file {path}: unknown key(s) {', '.join(map(repr, others))} "
                    "beside the [gates] table"
                )
            data = table
        return cls.from_mapping(data, source=f"gates file {path}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (for history entries and JSON output)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def default_gates() -> GateConfig:
    """The gates named by ``$FEDSEG_GATES_FILE`` when set, else :class:`GateConfig` defaults.

    Raises
    ------
    GateError
        The file named by the variable is missing or malformed: a misconfigured gate never
        silently falls back to the defaults.
    """
    path = os.environ.get(GATES_FILE_ENV, "").strip()
    return GateConfig.from_toml(path) if path else GateConfig()


@dataclass(frozen=True)
class GateResult:
    """The verdict of one gate.

    Attributes
    ----------
    name : str
        The gate: ``worst_site_dice``, ``worst_site_drop``, ``mean_dice_drop``, ``epsilon``,
        ``site_manifests`` or ``evaluated_sites``.
    passed : bool
        Whether the candidate meets it.
    detail : str
        The numbers behind the verdict, in words.
    """

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class VersionFacts:
    """What the gates need to know about one registered version, parsed from its tags.

    Absent or malformed tags become ``None`` (or empty mappings); the gates that need them fail
    or pass as documented on :class:`GateConfig`.
    """

    version: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    sites: Mapping[str, int] | None = None
    eval_sites: Mapping[str, float] | None = None
    dp: Mapping[str, Any] | None = None
    epsilon_sites: Mapping[str, float] | None = None
    site_manifests: Mapping[str, str] | None = None
    secure_aggregation: str | None = None
    eval_sites_uncounted: tuple[str, ...] | None = None  # sites that sent no voxel counts

    @classmethod
    def from_tags(cls, version: int, tags: Mapping[str, str]) -> VersionFacts:
        """Parse a model version's tags (``metric.*``, ``sites``, ``dp``, ...)."""
        metrics: dict[str, float] = {}
        for key, raw in tags.items():
            if key.startswith(METRIC_PREFIX):
                value = _to_float(raw)
                if value is not None:
                    metrics[key[len(METRIC_PREFIX):]] = value
        sites = _json_mapping(tags.get("sites"))
        eval_sites = _json_mapping(tags.get("eval_sites"))
        epsilons = _json_mapping(tags.get("epsilon_sites"))
        manifests = _json_mapping(tags.get("site_manifests"))
        uncounted = _json_strings(tags.get("eval_sites_uncounted"))
        return cls(
            version=int(version),
            metrics=metrics,
            sites=None if sites is None else {str(k): v for k, v in sites.items()},
            eval_sites=None if eval_sites is None else _floats(eval_sites),
            dp=_json_mapping(tags.get("dp")),
            epsilon_sites=None if epsilons is None else _floats(epsilons),
            site_manifests=None if manifests is None else {str(k): str(v) for k, v in manifests.items()},
            secure_aggregation=tags.get("secure_aggregation"),
            eval_sites_uncounted=uncounted,
        )

    @property
    def dice_pooled(self) -> float | None:
        return self.metrics.get("dice_pooled")

    def pooled_dice_gap(self) -> str:
        """Why ``dice_pooled`` is absent, in words (empty when it is there)."""
        if self.dice_pooled is not None:
            return ""
        if self.eval_sites_uncounted:
            return (f"v{self.version} has no {DECISION_METRIC}: site(s) "
                    f"{', '.join(self.eval_sites_uncounted)} sent no voxel counts "
                    f"({', '.join(DICE_COUNT_KEYS)})")
        return f"v{self.version} has no {DECISION_METRIC} recorded"

    @property
    def dice_mean(self) -> float | None:
        return self.metrics.get("dice_mean")

    @property
    def worst_site(self) -> tuple[str | None, float] | None:
        """``(site, Dice)`` of the worst evaluating site; site is None when only the metric is known."""
        if self.eval_sites:
            site = min(self.eval_sites, key=lambda s: self.eval_sites[s])  # type: ignore[index]
            value = min(self.eval_sites[site], self.metrics.get("dice_min", math.inf))
            return site, value
        if "dice_min" in self.metrics:
            return None, self.metrics["dice_min"]
        return None

    @property
    def dp_enabled(self) -> bool:
        return bool(self.dp) and self.dp.get("enabled") is True  # type: ignore[union-attr]


def evaluate_gates(
    candidate: VersionFacts, champion: VersionFacts | None, gates: GateConfig
) -> list[GateResult]:
    """Evaluate every gate for ``candidate`` against the current ``champion``.

    Parameters
    ----------
    candidate : VersionFacts
        The version to promote.
    champion : VersionFacts or None
        The current champion, or None when there is none.
    gates : GateConfig
        The thresholds.

    Returns
    -------
    list[GateResult]
        One result per gate, worst site first: ``worst_site_dice``, ``worst_site_drop``,
        ``mean_dice_drop``, ``epsilon``, ``site_manifests``, ``evaluated_sites``. Disabled gates
        pass and say so.
    """
    return [
        _worst_site_gate(candidate, gates),
        _worst_site_drop_gate(candidate, champion, gates),
        _mean_drop_gate(candidate, champion, gates),
        _epsilon_gate(candidate, gates),
        _manifest_gate(candidate, gates),
        _evaluated_sites_gate(candidate),
    ]


def _worst_site_gate(candidate: VersionFacts, gates: GateConfig) -> GateResult:
    name, threshold = "worst_site_dice", gates.min_worst_site_dice
    worst = candidate.worst_site
    if worst is None:
        if threshold <= 0.0:
            return GateResult(name, True, "no per-site Dice recorded; threshold 0 accepts any model")
        return GateResult(name, False, f"no per-site Dice recorded (dice_min, eval_sites); need >= {threshold:.4f}")
    site, value = worst
    where = f" ({site})" if site else ""
    ok = value + _TOLERANCE >= threshold
    return GateResult(name, ok, f"worst site Dice {value:.4f}{where} {'>=' if ok else '<'} {threshold:.4f}")


def _worst_site_drop_gate(
    candidate: VersionFacts, champion: VersionFacts | None, gates: GateConfig
) -> GateResult:
    name, limit = "worst_site_drop", gates.max_worst_site_dice_drop
    if champion is None:
        return GateResult(name, True, "no champion to compare with")
    if champion.worst_site is None:
        return GateResult(name, True, f"champion v{champion.version} has no per-site Dice to compare with")
    if candidate.worst_site is None:
        return GateResult(name, False, f"candidate has no per-site Dice; champion v{champion.version}'s "
                                       f"worst site has {champion.worst_site[1]:.4f}")
    (site, value), (champion_site, champion_value) = candidate.worst_site, champion.worst_site
    drop = champion_value - value
    ok = drop <= limit + _TOLERANCE
    return GateResult(
        name, ok,
        f"worst site {value:.4f}{f' ({site})' if site else ''} vs champion v{champion.version} "
        f"{champion_value:.4f}{f' ({champion_site})' if champion_site else ''}: "
        f"drop {max(drop, 0.0):.4f} {'<=' if ok else '>'} {limit:.4f}",
    )


def _mean_drop_gate(
    candidate: VersionFacts, champion: VersionFacts | None, gates: GateConfig
) -> GateResult:
    name, limit = "mean_dice_drop", gates.max_mean_dice_drop
    if champion is None:
        return GateResult(name, True, "no champion to compare with")
    if champion.dice_mean is None:
        return GateResult(name, True, f"champion v{champion.version} has no dice_mean to compare with")
    if candidate.dice_mean is None:
        return GateResult(
            name, False, f"candidate has no dice_mean; champion v{champion.version} has {champion.dice_mean:.4f}"
        )
    drop = champion.dice_mean - candidate.dice_mean
    ok = drop <= limit + _TOLERANCE
    return GateResult(
        name,
        ok,
        f"dice_mean {candidate.dice_mean:.4f} vs champion v{champion.version} {champion.dice_mean:.4f}: "
        f"drop {max(drop, 0.0):.4f} {'<=' if ok else '>'} {limit:.4f}",
    )


def _epsilon_gate(candidate: VersionFacts, gates: GateConfig) -> GateResult:
    name, limit = "epsilon", gates.max_epsilon
    if limit is None:
        return GateResult(name, True, "no epsilon gate configured")
    if not candidate.dp_enabled:
        return GateResult(name, False, f"trained without differential privacy: epsilon unbounded (limit {limit:g})")
    if not candidate.epsilon_sites:
        return GateResult(name, False, f"DP on but no epsilon_sites recorded: epsilon unbounded (limit {limit:g})")
    missing = sorted(set(candidate.sites or {}) - set(candidate.epsilon_sites))
    if missing:
        return GateResult(name, False, f"no epsilon recorded for site(s) {', '.join(missing)}: unbounded")
    over = {s: e for s, e in candidate.epsilon_sites.items() if not e <= limit + _TOLERANCE}
    worst_site = max(candidate.epsilon_sites, key=lambda s: candidate.epsilon_sites[s])  # type: ignore[index]
    worst = candidate.epsilon_sites[worst_site]
    if over:
        listed = ", ".join(f"{s}={e:g}" for s, e in sorted(over.items()))
        return GateResult(name, False, f"epsilon above {limit:g} at {listed}")
    return GateResult(name, True, f"max epsilon {worst:g} ({worst_site}) <= {limit:g}")


def _manifest_gate(candidate: VersionFacts, gates: GateConfig) -> GateResult:
    name = "site_manifests"
    if not gates.require_manifests:
        return GateResult(name, True, "site manifests not required")
    if not candidate.sites:
        return GateResult(name, False, "no training sites recorded, so no manifests can be checked")
    manifests = candidate.site_manifests or {}
    missing = sorted(s for s in candidate.sites if s not in manifests)
    if missing:
        return GateResult(name, False, f"no manifest for site(s) {', '.join(missing)}")
    malformed = sorted(s for s in candidate.sites if not _SHA256.match(manifests[s]))
    if malformed:
        return GateResult(name, False, f"manifest of site(s) {', '.join(malformed)} is not a SHA-256 hex digest")
    return GateResult(name, True, f"all {len(candidate.sites)} site(s) have a manifest")


def _evaluated_sites_gate(candidate: VersionFacts) -> GateResult:
    """Every training site sent a Dice of the published model: no site escapes the worst-site gate."""
    name = "evaluated_sites"
    if not candidate.sites:
        return GateResult(name, False, "no training sites recorded (sites): cannot check that each "
                                       "evaluated the published model")
    evaluated = candidate.eval_sites or {}
    missing = sorted(s for s in candidate.sites if s not in evaluated)
    if missing:
        return GateResult(name, False, f"site(s) {', '.join(missing)} trained but sent no evaluation of "
                                       "the published model (eval_sites); only a forced promotion "
                                       "with a reason can accept that")
    return GateResult(name, True, f"all {len(candidate.sites)} training site(s) evaluated the published model")


def _check_number(key: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateError(f"gate {key} must be a number, got {value!r}")
    if not (low <= float(value) <= high) or math.isnan(float(value)):
        raise GateError(f"gate {key} must be between {low:g} and {high:g}, got {value!r}")


def _to_float(raw: object) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _json_mapping(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _json_strings(raw: str | None) -> tuple[str, ...] | None:
    try:
        value = json.loads(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    return tuple(str(v) for v in value) if isinstance(value, list) else None


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, raw in values.items():
        value = _to_float(raw)
        if value is not None:
            out[str(key)] = value
    return out
