"""A site-local cache of preprocessed slices, so later rounds do not re-read every DICOM file.

The key covers the folder's files (relative path, size, modification time), the preprocessing
fields of the spec, the split and the series selection rules, so a changed, added or removed
file, another preprocessing or other selection rules miss the cache. Entries are written
atomically; a corrupt entry is ignored and rewritten. The cache holds pixels: it lives on the
site's own disk (``$FEDSEG_HOME/cache``) and never leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .selection import SeriesSelection
from .site_data import SiteDataset, load_site_dataset
from .site_folder import FileProblem
from .spec import ModelSpec

__all__ = ["CACHE_FORMAT", "load_site_dataset_cached", "site_fingerprint"]

CACHE_FORMAT = 2
_ARRAYS = ("train_images", "train_masks", "test_images", "test_masks")


def site_fingerprint(
    root: Path, spec: ModelSpec, test_fraction: float, seed: int,
    selection: SeriesSelection | None = None,
) -> str:
    """SHA-256 over the folder's file list and stats, the preprocessing and the selection."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    preprocessing = {
        "format": CACHE_FORMAT, "root": str(root), "image_size": spec.image_size,
        "lower": spec.lower_percentile, "upper": spec.upper_percentile,
        "test_fraction": test_fraction, "seed": seed,
        "selection": (selection or SeriesSelection()).to_dict(),
    }
    h.update(json.dumps(preprocessing, sort_keys=True).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read(entry: Path) -> SiteDataset | None:
    try:
        with np.load(entry, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in _ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    if "input_stats" not in meta:
        return None
    return SiteDataset(
        **arrays,
        train_patients=meta["train_patients"],
        test_patients=meta["test_patients"],
        cases_without_seg=meta["cases_without_seg"],
        problems=[FileProblem(Path(p[0]), *p[1:]) for p in meta["problems"]],
        vendors=meta["vendors"],
        input_stats=meta["input_stats"],
        manifest_sha256=meta["manifest_sha256"],
    )


def _write(entry: Path, data: SiteDataset) -> None:
    meta = {
        "train_patients": data.train_patients, "test_patients": data.test_patients,
        "cases_without_seg": data.cases_without_seg, "vendors": data.vendors,
        "problems": [[str(p.path), p.reason, p.kind] for p in data.problems],
        "input_stats": data.input_stats, "manifest_sha256": data.manifest_sha256,
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **{k: getattr(data, k) for k in _ARRAYS})
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_site_dataset_cached(
    root: Path, spec: ModelSpec, *, test_fraction: float, seed: int, cache_dir: Path | None,
    selection: SeriesSelection | None = None,
) -> SiteDataset:
    """:func:`load_site_dataset`, served from ``cache_dir`` when the folder has not changed."""
    if cache_dir is None:
        return load_site_dataset(root, spec, test_fraction=test_fraction, seed=seed,
                                 selection=selection)
    prefix = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    fingerprint = site_fingerprint(root, spec, test_fraction, seed, selection)
    entry = Path(cache_dir) / f"{prefix}-{fingerprint}.npz"
    if entry.exists():
        cached = _read(entry)
        if cached is not None:
            return cached
    data = load_site_dataset(root, spec, test_fraction=test_fraction, seed=seed, selection=selection)
    _write(entry, data)
    for stale in Path(cache_dir).glob(f"{prefix}-*.npz"):  # older states of this folder
        if stale != entry:
            stale.unlink(missing_ok=True)
    return data
