"""The dossier's judgements, as pure functions of decoded facts: bias by vendor, PHI-like
strings, input drift, convergence, hosting and manifests. No MLflow, no rendering."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .run_history import Series

__all__ = [
    "BIAS_GAP_THRESHOLD",
    "WORST_SITE_DICE_THRESHOLD",
    "DRIFT_FLAG_FRACTION",
    "CONVERGENCE_TOLERANCE",
    "VendorDice",
    "Gap",
    "PhiFinding",
    "DriftRow",
    "Convergence",
    "vendor_dice",
    "gap",
    "scan_phi",
    "redact_phi",
    "intensity_drift",
    "convergence",
    "hosting_status",
    "manifest_status",
]

BIAS_GAP_THRESHOLD = 0.1  # Dice gap between best and worst group that the dossier flags
WORST_SITE_DICE_THRESHOLD = 0.7  # below this, the worst site gets a recommendation
DRIFT_FLAG_FRACTION = 0.1  # p50 deviation, as a share of the reference p01..p99 range, flagged
CONVERGENCE_TOLERANCE = 0.005  # a last-round rise of pooled Dice above this = not converged

UID_LIKE = re.compile(r"\b\d+(?:\.\d+){5,}\b")
PERSON_NAME_LIKE = re.compile(r"\w+\^\w+")


@dataclass(frozen=True)
class VendorDice:
    vendor: str
    dice: float  # series-weighted mean of the Dice of the sites holding this vendor's series
    series: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class Gap:
    best: str
    best_dice: float
    worst: str
    worst_dice: float

    @property
    def value(self) -> float:
        return self.best_dice - self.worst_dice

    @property
    def flagged(self) -> bool:
        return self.value > BIAS_GAP_THRESHOLD


@dataclass(frozen=True)
class PhiFinding:
    where: str
    kind: str  # "DICOM UID-like" or "PatientName-like"
    excerpt: str  # masked: enough to find it, not enough to re-identify


@dataclass(frozen=True)
class DriftRow:
    site: str
    p50: float
    reference_p50: float
    delta: float
    fraction_of_range: float | None  # |delta| / (reference p99 - p01), when both are known

    @property
    def flagged(self) -> bool:
        return self.fraction_of_range is not None and self.fraction_of_range > DRIFT_FLAG_FRACTION


@dataclass(frozen=True)
class Convergence:
    converged: bool | None  # None: not enough rounds to judge
    last_rise: float | None
    rounds: int


def vendor_dice(site_dice: Mapping[str, float], site_inputs: Mapping[str, Any]) -> list[VendorDice]:
    """Dice by scanner vendor, best first.

    A site's Dice is not split by vendor, so each vendor gets the mean of the Dice of the sites
    that hold its series, weighted by how many of its series each site holds; a site with several
    vendors contributes to each. Sites without Dice or without vendor counts are skipped.
    """
    totals: dict[str, list[float]] = {}  # vendor -> [weighted dice sum, series]
    sites: dict[str, list[str]] = {}
    for site, dice in sorted(site_dice.items()):
        vendors = (site_inputs.get(site) or {}).get("vendors") or {}
        for vendor, count in sorted(vendors.items()):
            weight = float(count)
            if weight <= 0:
                continue
            acc = totals.setdefault(str(vendor), [0.0, 0.0])
            acc[0] += weight * float(dice)
            acc[1] += weight
            sites.setdefault(str(vendor), []).append(site)
    rows = [
        VendorDice(vendor, acc[0] / acc[1], int(acc[1]), tuple(sites[vendor]))
        for vendor, acc in totals.items()
    ]
    return sorted(rows, key=lambda r: (-r.dice, r.vendor))


def gap(values: Mapping[str, float]) -> Gap | None:
    """Best and worst of ``values`` (None with fewer than one value)."""
    if not values:
        return None
    best = max(sorted(values), key=lambda k: values[k])
    worst = min(sorted(values), key=lambda k: values[k])
    return Gap(best, float(values[best]), worst, float(values[worst]))


def scan_phi(sources: Iterable[tuple[str, str]]) -> list[PhiFinding]:
    """DICOM-UID-like and PatientName-like strings in ``(where, text)`` pairs."""
    findings = []
    for where, text in sources:
        for match in UID_LIKE.finditer(text):
            findings.append(PhiFinding(where, "DICOM UID-like", _mask_uid(match.group())))
        for match in PERSON_NAME_LIKE.finditer(text):
            findings.append(PhiFinding(where, "PatientName-like", _mask_name(match.group())))
    return findings


def redact_phi(text: str) -> str:
    """``text`` with UID-like and PatientName-like strings replaced by a marker."""
    text = UID_LIKE.sub("[redacted UID-like]", text)
    return PERSON_NAME_LIKE.sub("[redacted name-like]", text)


def _mask_uid(uid: str) -> str:
    parts = uid.split(".")
    return f"{parts[0]}.{parts[1]}.… ({len(parts)} components)"


def _mask_name(name: str) -> str:
    return "^".join(f"{p[:1]}…" for p in name.split("^"))


def intensity_drift(
    site_inputs: Mapping[str, Any], reference: Mapping[str, Any] | None
) -> tuple[list[DriftRow], str]:
    """Each site's median intensity against the reference, and where the reference came from.

    The reference is ``input_reference`` when recorded, else the slice-weighted mean of the
    sites' medians (and then no range is known to scale the deviation).
    """
    medians = {
        site: (float(stats["intensity_p50"]), float(stats.get("slices") or 1))
        for site, stats in sorted(site_inputs.items())
        if isinstance(stats, Mapping) and _is_number(stats.get("intensity_p50"))
    }
    if not medians:
        return [], "no intensity statistics"
    spread: float | None = None
    if reference and _is_number(reference.get("intensity_p50")):
        ref = float(reference["intensity_p50"])
        source = "recorded input reference (input_reference)"
        if _is_number(reference.get("intensity_p99")) and _is_number(reference.get("intensity_p01")):
            spread = float(reference["intensity_p99"]) - float(reference["intensity_p01"])
    else:
        total = sum(w for _, w in medians.values())
        ref = sum(v * w for v, w in medians.values()) / total
        source = "slice-weighted mean of the sites' medians (no input_reference recorded)"
    rows = [
        DriftRow(site, p50, ref, p50 - ref, abs(p50 - ref) / spread if spread and spread > 0 else None)
        for site, (p50, _) in medians.items()
    ]
    return rows, source


def convergence(pooled: Series) -> Convergence:
    """Whether pooled Dice was still rising at the last round."""
    if len(pooled) < 2:
        return Convergence(None, None, len(pooled))
    rise = float(pooled[-1][1]) - float(pooled[-2][1])
    return Convergence(rise <= CONVERGENCE_TOLERANCE, rise, len(pooled))


def hosting_status(tracking_uri: str) -> tuple[str, str]:
    """(status, detail) of the HDS hosting item, from where the registry lives."""
    scheme = urlsplit(tracking_uri).scheme or "file"
    if scheme == "sqlite":
        return "TO CONFIRM", (
            "embedded sqlite registry on the coordinator's disk: whether that host is HDS-certified "
            "is to be confirmed by the operator"
        )
    if scheme in ("http", "https"):
        host = urlsplit(tracking_uri).hostname or "?"
        tls = "" if scheme == "https" else "; the connection is not TLS-protected"
        return "TO CONFIRM", (
            f"MLflow tracking server at {host} ({scheme}){tls}: the operator must confirm that it "
            "runs on HDS-certified hosting"
        )
    return "TO CONFIRM", (
        f"registry store of scheme {scheme!r}: HDS certification of its hosting is to be "
        "confirmed by the operator"
    )


def manifest_status(sites: Iterable[str], manifests: Mapping[str, Any] | None) -> tuple[str, str]:
    """(status, detail): every training site has a SHA-256 data manifest digest."""
    sites = sorted(sites)
    if manifests is None:
        return "FAIL", "no site_manifests recorded for this version"
    if not sites:
        return "FAIL", "the version names no training sites"
    missing = [s for s in sites if not _is_sha256(manifests.get(s))]
    if missing:
        return "FAIL", f"no valid manifest digest for: {', '.join(missing)}"
    return "PASS", f"SHA-256 manifest digest recorded for all {len(sites)} sites"


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value) is not None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
