"""Aggregate, non-identifying facts about a site's inputs: the drift reference and a manifest hash.

Nothing here names a patient or a series: counts, percentiles, vendor names, and one SHA-256
over the (hashed) series list so that the coordinator can tell that a site's data changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .volume import Volume

__all__ = ["InputStatsBuilder"]

_SAMPLE_PER_SERIES = 20_000  # voxels sampled per series for the percentiles


@dataclass
class InputStatsBuilder:
    """Accumulates per-series facts; ``stats()`` and ``manifest_sha256()`` summarise them."""

    seed: int = 0
    vendors: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    slices: int = 0
    _samples: list[np.ndarray] = field(default_factory=list)
    _spacings: list[tuple[float, float, float]] = field(default_factory=list)
    _manifest: list[str] = field(default_factory=list)

    def add(self, volume: Volume, has_seg: bool) -> None:
        vendor = volume.manufacturer or "unknown"
        self.vendors[vendor] = self.vendors.get(vendor, 0) + 1
        modality = volume.modality or "unknown"
        self.modalities[modality] = self.modalities.get(modality, 0) + 1
        self.slices += volume.shape[0]
        flat = volume.pixels.reshape(-1)
        rng = np.random.default_rng(self.seed + len(self._samples))
        take = min(flat.size, _SAMPLE_PER_SERIES)
        self._samples.append(rng.choice(flat, size=take, replace=False))
        self._spacings.append(volume.spacing)
        uid_hash = hashlib.sha256(volume.series_uid.encode()).hexdigest()
        self._manifest.append(f"{uid_hash}:{volume.shape[0]}:{int(has_seg)}")

    def stats(self) -> dict[str, Any]:
        if not self._samples:
            return {"series": 0, "slices": 0}
        pooled = np.concatenate(self._samples)
        p01, p50, p99 = (float(v) for v in np.percentile(pooled, [1, 50, 99]))
        return {
            "series": len(self._samples),
            "slices": self.slices,
            "vendors": dict(sorted(self.vendors.items())),
            "modalities": dict(sorted(self.modalities.items())),
            "intensity_p01": round(p01, 3),
            "intensity_p50": round(p50, 3),
            "intensity_p99": round(p99, 3),
            "spacing_mm": [round(float(v), 3) for v in np.median(np.array(self._spacings), axis=0)],
        }

    def manifest_sha256(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self._manifest)).encode()).hexdigest()
