"""Input drift: each request's input statistics against the training reference of the model.

The reference comes from the registered version's lineage tags: ``input_reference`` (the
slice-weighted intensity percentiles and vendor counts of the training sites, see
:func:`server.federation.input_reference`) and ``site_inputs`` (each site's median voxel
spacing). Each request contributes the same statistics, computed the way the sites computed
theirs (:mod:`imaging.site_stats`): the 1st, 50th and 99th intensity percentiles of the raw
series (rescale applied), the voxel spacing and the vendor. :class:`DriftMonitor` keeps the last
``window`` requests and reports, per statistic, the window mean's relative deviation from the
reference:

- intensity percentiles: ``|mean - ref| / (ref_p99 - ref_p01)`` (a shift as a share of the
  training intensity range; a relative error on ``p01`` near 0 would mean nothing);
- spacings: ``|mean - ref| / ref``;
- ``vendor_unseen``: the share of requests whose vendor no training site reported.

The alert is raised when the window holds at least ``min_requests`` requests and any deviation
exceeds ``threshold`` (``FEDSEG_SERVE_DRIFT_THRESHOLD``). Only aggregate numbers are kept: no
identifier of a series or a patient.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imaging.volume import Volume
from registry.load import LoadedModel

from . import metrics

__all__ = [
    "DriftMonitor",
    "DriftReport",
    "InputReference",
    "InputStats",
    "StatDrift",
    "input_stats",
    "observe_input",
    "recording_references",
]

INTENSITY_STATS = ("intensity_p01", "intensity_p50", "intensity_p99")
SPACING_STATS = ("spacing_slice_mm", "spacing_row_mm", "spacing_col_mm")
NUMERIC_STATS = INTENSITY_STATS + SPACING_STATS
VENDOR_STAT = "vendor_unseen"
UNKNOWN_VENDOR = "unknown"
SAMPLE_VOXELS = 20_000  # as imaging.site_stats samples each training series


@dataclass(frozen=True)
class InputStats:
    """The statistics of one request's series (no identifiers)."""

    values: dict[str, float]
    vendor: str


def input_stats(volume: Volume, *, seed: int = 0) -> InputStats:
    """Intensity percentiles (of at most 20,000 sampled voxels), spacing and vendor of a series."""
    flat = np.asarray(volume.pixels, dtype=np.float32).reshape(-1)
    if flat.size > SAMPLE_VOXELS:
        flat = np.random.default_rng(seed).choice(flat, size=SAMPLE_VOXELS, replace=False)
    finite = flat[np.isfinite(flat)]
    values: dict[str, float] = {}
    if finite.size:
        p01, p50, p99 = (float(v) for v in np.percentile(finite, [1, 50, 99]))
        values.update(intensity_p01=p01, intensity_p50=p50, intensity_p99=p99)
    for key, spacing in zip(SPACING_STATS, volume.spacing, strict=True):
        if np.isfinite(spacing) and spacing > 0:
            values[key] = float(spacing)
    return InputStats(values=values, vendor=(volume.manufacturer or "").strip() or UNKNOWN_VENDOR)


@dataclass(frozen=True)
class InputReference:
    """The training reference of one model version."""

    version: int
    values: dict[str, float]
    vendors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tags(cls, version: int, tags: Mapping[str, str]) -> InputReference | None:
        """Read ``input_reference`` (and spacing from ``site_inputs``); None when not recorded."""
        ref = _json_dict(tags.get("input_reference"))
        if not ref:
            return None
        values = {k: float(ref[k]) for k in INTENSITY_STATS if _is_number(ref.get(k))}
        vendors = {str(k): int(v) for k, v in (ref.get("vendors") or {}).items() if _is_number(v)}
        values.update(_reference_spacing(_json_dict(tags.get("site_inputs"))))
        if not values and not vendors:
            return None
        return cls(version=version, values=values, vendors=vendors)


def _reference_spacing(sites: Mapping[str, Any]) -> dict[str, float]:
    """Slice-weighted mean of the sites' median spacings, per axis."""
    rows = [
        (s["spacing_mm"], float(s.get("slices") or 1))
        for s in sites.values()
        if isinstance(s, Mapping)
        and isinstance(s.get("spacing_mm"), list) and len(s["spacing_mm"]) == 3
        and all(_is_number(v) for v in s["spacing_mm"])
    ]
    if not rows:
        return {}
    total = sum(w for _, w in rows)
    return {
        key: sum(float(sp[axis]) * w for sp, w in rows) / total
        for axis, key in enumerate(SPACING_STATS)
    }


def _json_dict(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


@dataclass(frozen=True)
class StatDrift:
    """One statistic of the window against the reference."""

    stat: str
    reference: float | None
    current: float | None
    relative_deviation: float | None
    over_threshold: bool


@dataclass(frozen=True)
class DriftReport:
    """The window's drift against the reference of ``reference_version``."""

    reference_version: int | None
    requests: int
    window: int
    threshold: float
    min_requests: int
    alert: bool
    stats: list[StatDrift]
    vendors: dict[str, int]
    detail: str


class DriftMonitor:
    """A rolling window of request statistics, compared with the served model's reference.

    Thread-safe: requests observe from the threadpool while ``/v1/drift`` and ``/metrics`` read.

    Parameters
    ----------
    window : int
        How many recent requests are compared.
    threshold : float
        A relative deviation above this raises the alert.
    min_requests : int
        No alert before the window holds this many requests.
    """

    def __init__(self, *, window: int = 200, threshold: float = 0.25, min_requests: int = 20) -> None:
        if window < 1 or min_requests < 1 or not threshold > 0:
            raise ValueError("drift window and min_requests must be >= 1 and threshold > 0")
        self.window = window
        self.threshold = threshold
        self.min_requests = min(min_requests, window)
        self._samples: deque[InputStats] = deque(maxlen=window)
        self._references: dict[int, InputReference | None] = {}
        self._version: int | None = None  # the version whose reference applies
        self._lock = threading.Lock()

    def set_reference(self, version: int, reference: InputReference | None) -> None:
        """Record the reference of a loaded version (None: that version has none)."""
        with self._lock:
            self._references[version] = reference
            if self._version is None:
                self._version = version

    def observe(self, stats: InputStats, version: int | None = None) -> None:
        """Add one request; ``version`` (the version that served it) selects the reference."""
        with self._lock:
            self._samples.append(stats)
            if version is not None:
                self._version = version

    def report(self) -> DriftReport:
        """The current comparison (see the module docstring for the deviations)."""
        with self._lock:
            samples = list(self._samples)
            version = self._version
            reference = self._references.get(version) if version is not None else None
        vendors: dict[str, int] = {}
        for s in samples:
            vendors[s.vendor] = vendors.get(s.vendor, 0) + 1
        if reference is None:
            detail = (
                "no model loaded yet" if version is None
                else f"model version {version} has no input_reference lineage tag: nothing to compare"
            )
            return DriftReport(version, len(samples), self.window, self.threshold, self.min_requests,
                               False, [], dict(sorted(vendors.items())), detail)
        rows = [self._numeric(key, reference, samples) for key in NUMERIC_STATS
                if key in reference.values]
        if reference.vendors:
            rows.append(self._vendor(reference, samples))
        enough = len(samples) >= self.min_requests
        alert = enough and any(r.over_threshold for r in rows)
        if not samples:
            detail = "no request observed yet"
        elif not enough:
            detail = f"{len(samples)} of the {self.min_requests} requests needed before alerting"
        elif alert:
            over = ", ".join(r.stat for r in rows if r.over_threshold)
            detail = f"inputs drifted from the training reference: {over}"
        else:
            detail = "inputs within the training reference"
        return DriftReport(version, len(samples), self.window, self.threshold, self.min_requests,
                           alert, rows, dict(sorted(vendors.items())), detail)

    def _numeric(self, key: str, reference: InputReference, samples: list[InputStats]) -> StatDrift:
        ref = reference.values[key]
        seen = [s.values[key] for s in samples if key in s.values]
        current = float(np.mean(seen)) if seen else None
        scale: float | None
        if key in INTENSITY_STATS:
            lo, hi = reference.values.get("intensity_p01"), reference.values.get("intensity_p99")
            scale = hi - lo if lo is not None and hi is not None and hi > lo else abs(ref) or None
        else:
            scale = ref if ref > 0 else None
        deviation = abs(current - ref) / scale if current is not None and scale else None
        over = deviation is not None and deviation > self.threshold
        return StatDrift(key, ref, current, deviation, over)

    def _vendor(self, reference: InputReference, samples: list[InputStats]) -> StatDrift:
        share = (
            sum(s.vendor not in reference.vendors for s in samples) / len(samples) if samples else None
        )
        over = share is not None and share > self.threshold
        return StatDrift(VENDOR_STAT, 0.0, share, share, over)


class DriftCollector(Collector):
    """Exports a monitor's report as gauges at scrape time."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.monitor.report()
        deviation = GaugeMetricFamily(
            "fedseg_drift_relative_deviation",
            "Relative deviation of the recent requests' input statistic from the training reference",
            labels=["stat"])
        current = GaugeMetricFamily(
            "fedseg_drift_input_value", "Mean of the input statistic over the drift window",
            labels=["stat"])
        reference = GaugeMetricFamily(
            "fedseg_drift_reference_value", "The training reference of the input statistic",
            labels=["stat"])
        for row in report.stats:
            if row.relative_deviation is not None:
                deviation.add_metric([row.stat], row.relative_deviation)
            if row.current is not None:
                current.add_metric([row.stat], row.current)
            if row.reference is not None:
                reference.add_metric([row.stat], row.reference)
        yield deviation
        yield current
        yield reference
        yield GaugeMetricFamily("fedseg_drift_alert", "1 when input drift exceeds the threshold",
                                value=float(report.alert))
        yield GaugeMetricFamily("fedseg_drift_window_requests", "Requests in the drift window",
                                value=float(report.requests))
        yield GaugeMetricFamily("fedseg_drift_threshold", "Relative deviation that raises the alert",
                                value=report.threshold)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no fixed description: read at scrape time only


def recording_references(
    loader: Callable[[str], LoadedModel], monitor: DriftMonitor
) -> Callable[[str], LoadedModel]:
    """Wrap a model loader so that each loaded version's reference reaches ``monitor``."""

    def load(uri: str) -> LoadedModel:
        model = loader(uri)
        monitor.set_reference(model.version, InputReference.from_tags(model.version, model.tags))
        return model

    return load


def observe_input(volume: Volume, version: int | None = None) -> None:
    """Add one request's series to the drift window of the current app (see :mod:`.metrics`)."""
    m = metrics.current()
    monitor = getattr(m, "drift", None) if m is not None else None
    if isinstance(monitor, DriftMonitor):
        monitor.observe(input_stats(volume), version)
