"""A site's DICOM folder as preprocessed training and held-out test slices.

Patients, never slices, are split into train and test, deterministically from the seed, so
every round and every run of a site sees the same held-out patients.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, ImagingError, NoUsableSeriesError
from .preprocess import preprocess_image, preprocess_mask
from .selection import SeriesSelection
from .site_folder import FileProblem, load_case, problem_kind, scan_site
from .site_stats import InputStatsBuilder
from .spec import ModelSpec

__all__ = ["SiteDataset", "load_site_dataset", "split_patients"]


@dataclass
class SiteDataset:
    """Preprocessed slices of one site; nothing here leaves the site."""

    train_images: np.ndarray
    train_masks: np.ndarray
    test_images: np.ndarray
    test_masks: np.ndarray
    train_patients: int
    test_patients: int
    cases_without_seg: int = 0
    problems: list[FileProblem] = field(default_factory=list)
    vendors: dict[str, int] = field(default_factory=dict)
    input_stats: dict[str, Any] = field(default_factory=dict)  # aggregate, see site_stats
    manifest_sha256: str = ""

    @property
    def num_train(self) -> int:
        return int(len(self.train_images))

    @property
    def num_test(self) -> int:
        return int(len(self.test_images))


def split_patients(patients: list[str], test_fraction: float, seed: int) -> tuple[set, set]:
    """Split patient ids into (train, test) by a seeded hash; at least one of each when >= 2."""
    if not 0 <= test_fraction < 1:
        raise DataError(f"test fraction must lie in [0, 1), got {test_fraction}")
    unique = sorted(set(patients))
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_test = math.ceil(len(unique) * test_fraction) if len(unique) >= 2 else 0
    n_test = min(n_test, len(unique) - 1) if test_fraction > 0 else 0
    return set(ranked[n_test:]), set(ranked[:n_test])


def _stack(arrays: list[np.ndarray], size: int, dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, size, size), dtype=dtype)


def _problem_counts(problems: list[FileProblem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return counts


def load_site_dataset(
    root: Path,
    spec: ModelSpec,
    *,
    test_fraction: float,
    seed: int,
    selection: SeriesSelection | None = None,
) -> SiteDataset:
    """Read every labelled series under ``root`` that ``selection`` keeps; preprocess for ``spec``.

    Series without a SEG are counted and left out of training (they have no ground truth); a
    series that cannot be read is recorded in ``problems`` and left out; a series that the
    selection rules exclude is left out silently.
    """
    scan = scan_site(Path(root))
    rules = selection or SeriesSelection()
    cases = [c for c in scan.cases
             if rules.reason_to_exclude(c.modality, c.series_description, len(c.files)) is None]
    labelled = [case for case in cases if case.seg_file is not None]
    if not labelled:
        raise NoUsableSeriesError(
            f"no selected series with a DICOM SEG found under {root} "
            f"({len(cases)} selected series without SEG, {len(scan.cases) - len(cases)} series "
            f"excluded by the selection rules, {len(scan.problems)} unreadable files)",
            labelled=0, unlabelled=len(cases), excluded=len(scan.cases) - len(cases),
            problems=_problem_counts(scan.problems),
        )
    train_ids, test_ids = split_patients([c.patient_id for c in labelled], test_fraction, seed)
    buckets: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    vendors: dict[str, int] = {}
    stats = InputStatsBuilder(seed=seed)
    problems = list(scan.problems)
    for case in labelled:
        try:
            volume, mask = load_case(case)
        except ImagingError as exc:  # one broken series must not sink the site: record it
            problems.append(FileProblem(case.files[0].parent, f"series unusable: {exc}", problem_kind(exc)))
            continue
        assert mask is not None
        stats.add(volume, has_seg=True)
        bucket = buckets["test" if case.patient_id in test_ids else "train"]
        bucket[0].append(preprocess_image(volume.pixels, spec))
        bucket[1].append(preprocess_mask(mask, spec))
        vendor = volume.manufacturer or "unknown"
        vendors[vendor] = vendors.get(vendor, 0) + 1
    if not buckets["train"][0] and not buckets["test"][0]:
        raise NoUsableSeriesError(
            f"no usable labelled series under {root}: " + "; ".join(p.reason for p in problems[:3]),
            labelled=len(labelled), unlabelled=len(cases) - len(labelled),
            excluded=len(scan.cases) - len(cases), problems=_problem_counts(problems),
        )
    s = spec.image_size
    return SiteDataset(
        train_images=_stack(buckets["train"][0], s, np.float32),
        train_masks=_stack(buckets["train"][1], s, np.uint8),
        test_images=_stack(buckets["test"][0], s, np.float32),
        test_masks=_stack(buckets["test"][1], s, np.uint8),
        train_patients=len(train_ids),
        test_patients=len(test_ids),
        cases_without_seg=len(cases) - len(labelled),
        problems=problems,
        vendors=vendors,
        input_stats=stats.stats(),
        manifest_sha256=stats.manifest_sha256(),
    )
