"""``fedseg site check``: what a node would train on, every problem per file, and a shareable manifest.

:func:`check_site` syncs the site's source (a PACS fetches into its cache), scans the DICOM,
applies the selection rules and reads each selected series and its SEG the way training does.
The :class:`SiteCheck` it returns renders as a table or JSON for hospital IT (local paths
included) and as a manifest for the coordinator: counts, vendor mix and HMAC-SHA256 hashes of the
identifiers under a key that never leaves the site, no name, id, UID, date or institution.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from imaging.dicom_read import check_decodable, read_header, read_series, sort_slices
from imaging.dicom_seg import read_seg_mask
from imaging.errors import DicomReadError, ImagingError, SeriesError, UnsupportedTransferSyntaxError
from imaging.home import fedseg_home
from imaging.site_folder import Case, FileProblem, scan_site

from .site import Site
from .sources import SyncReport

__all__ = [
    "PROBLEM_KINDS",
    "ProblemFile",
    "SeriesFacts",
    "SiteCheck",
    "check_site",
    "manifest_key",
]

NOT_DICOM = "not-dicom"
UNREADABLE = "unreadable"
UNSUPPORTED_OBJECT = "unsupported-object"
TRANSFER_SYNTAX = "unsupported-transfer-syntax"
GEOMETRY = "inconsistent-geometry"
MISSING_SEG = "missing-seg"
BAD_SEG = "unusable-seg"
#: Every problem kind, in report order.
PROBLEM_KINDS = (NOT_DICOM, UNREADABLE, UNSUPPORTED_OBJECT, TRANSFER_SYNTAX, GEOMETRY, MISSING_SEG,
                 BAD_SEG)
MANIFEST_FORMAT = "fedseg-site-manifest/1"


@dataclass(frozen=True)
class ProblemFile:
    """One file (or series folder) that cannot be used as it is, and why."""

    file: str
    problem: str  # one of PROBLEM_KINDS
    detail: str


@dataclass
class SeriesFacts:
    """What the check learnt about one image series (kept on the site, except ``manifest_row``)."""

    id: str  # HMAC of the SeriesInstanceUID
    study: str  # HMAC of the StudyInstanceUID
    patient: str  # HMAC of the PatientID
    folder: str
    modality: str
    description: str
    vendor: str
    model: str
    slices: int
    selected: bool = True
    excluded_reason: str | None = None
    readable: bool = False
    has_seg: bool = False
    mask_ok: bool = False
    rows: int = 0
    cols: int = 0
    spacing_mm: tuple[float, float, float] | None = None
    orientation: str = "unknown"
    intensity: dict[str, float] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Selected, readable, and labelled by a SEG that aligns: training uses it."""
        return self.selected and self.readable and self.has_seg and self.mask_ok

    def manifest_row(self) -> dict[str, Any]:
        return {"id": self.id, "study": self.study, "patient": self.patient,
                "modality": self.modality, "vendor": self.vendor, "model": self.model,
                "slices": self.slices, "seg": self.has_seg, "usable": self.usable}


def _hist(values: Sequence[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


@dataclass
class SiteCheck:
    """The outcome of :func:`check_site`."""

    site: str
    source_kind: str
    source: str
    selection: dict[str, Any]
    sync: SyncReport
    series: list[SeriesFacts]
    problems: list[ProblemFile]
    key_id: str

    @property
    def selected(self) -> list[SeriesFacts]:
        return [s for s in self.series if s.selected]

    @property
    def usable_series(self) -> list[SeriesFacts]:
        return [s for s in self.series if s.usable]

    @property
    def usable(self) -> bool:
        """Whether the node has anything to train on."""
        return bool(self.usable_series)

    @property
    def series_found(self) -> int:
        """Image series the source holds (a PACS: all its listed series, fetched or not)."""
        if self.sync.series_listed is not None:
            return self.sync.series_listed
        return len(self.series)

    @property
    def excluded(self) -> list[str]:
        reasons = [s.excluded_reason for s in self.series if s.excluded_reason]
        return [*reasons, *self.sync.excluded]

    def counts(self) -> dict[str, int]:
        selected, usable = self.selected, self.usable_series
        return {
            "studies": len({s.study for s in selected}),
            "patients": len({s.patient for s in selected}),
            "series": self.series_found,
            "series_selected": len(selected),
            "series_excluded": len(self.excluded),
            "series_usable": len(usable),
            "slices": sum(s.slices for s in selected),
            "slices_usable": sum(s.slices for s in usable),
            "masks_found": sum(s.has_seg for s in selected),
            "masks_missing": sum(not s.has_seg for s in selected),
            "masks_unusable": sum(s.has_seg and s.readable and not s.mask_ok for s in selected),
        }

    def problem_counts(self) -> dict[str, int]:
        counts = Counter(p.problem for p in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def _acquisition(self) -> dict[str, Any]:
        selected = self.selected
        readable = [s for s in selected if s.readable]
        spacings = np.array([s.spacing_mm for s in readable if s.spacing_mm is not None])
        intens = [s.intensity for s in readable if s.intensity]
        return {
            "vendors": _hist([s.vendor for s in selected]),
            "models": _hist([f"{s.vendor} / {s.model}" for s in selected]),
            "modalities": _hist([s.modality for s in selected]),
            "orientations": _hist([s.orientation for s in selected]),  # from headers
            "spacing_mm": ({"min": [round(float(v), 3) for v in spacings.min(axis=0)],
                            "max": [round(float(v), 3) for v in spacings.max(axis=0)]}
                           if len(spacings) else {}),
            "intensity": ({"min": min(i["min"] for i in intens), "max": max(i["max"] for i in intens),
                           "p01": min(i["p01"] for i in intens), "p99": max(i["p99"] for i in intens)}
                          if intens else {}),
        }

    def report(self) -> dict[str, Any]:
        """The full local report (paths included; it stays on the site)."""
        counts = self.counts()
        return {
            "site": self.site,
            "source": {"kind": self.source_kind, "location": self.source},
            "selection": self.selection,
            "usable": self.usable,
            **{k: v for k, v in counts.items() if not k.startswith("masks_")},
            "masks": {"found": counts["masks_found"], "missing": counts["masks_missing"],
                      "unusable": counts["masks_unusable"]},
            **self._acquisition(),
            "problem_counts": self.problem_counts(),
            "problems": [{"file": p.file, "problem": p.problem, "detail": p.detail}
                         for p in self.problems],
            "excluded": self.excluded,
            "series_details": [
                {"id": s.id, "folder": s.folder, "modality": s.modality,
                 "description": s.description, "vendor": s.vendor, "model": s.model,
                 "slices": s.slices, "rows": s.rows, "cols": s.cols,
                 "spacing_mm": list(s.spacing_mm) if s.spacing_mm else None,
                 "orientation": s.orientation, "intensity": s.intensity, "selected": s.selected,
                 "excluded_reason": s.excluded_reason, "seg": s.has_seg, "usable": s.usable}
                for s in self.series
            ],
            "sync": {"series_fetched": self.sync.series_fetched,
                     "instances_fetched": self.sync.instances_fetched,
                     "series_unchanged": self.sync.series_unchanged,
                     "offline": self.sync.offline},
        }

    def manifest(self) -> dict[str, Any]:
        """What may be shared with the coordinator: counts, vendor mix, keyed hashes; no PHI."""
        acquisition = self._acquisition()
        return {
            "format": MANIFEST_FORMAT,
            "site": self.site,
            "source_kind": self.source_kind,
            "usable": self.usable,
            "hash": "hmac-sha256",
            "key_id": self.key_id,
            "counts": self.counts(),
            "problem_counts": self.problem_counts(),
            **{k: acquisition[k] for k in ("vendors", "models", "modalities", "orientations",
                                           "spacing_mm")},
            "series": sorted((s.manifest_row() for s in self.selected), key=lambda r: r["id"]),
        }

    def table(self) -> str:
        """The human-readable report."""
        c, a = self.counts(), self._acquisition()
        sel = self.selection
        rules = "; ".join(filter(None, [
            f"modality {', '.join(sel['modality'])}" if sel["modality"] else "",
            f"description ~ {sel['series_description']}" if sel["series_description"] else "",
            f"min {sel['min_slices']} slices" if sel["min_slices"] else "",
        ])) or "every series"
        lines = [
            f"site {self.site}: {self.source}",
            f"selection: {rules}",
            "",
            f"  studies      {c['studies']}    patients {c['patients']}",
            f"  series       {c['series']} found, {c['series_selected']} selected, "
            f"{c['series_excluded']} excluded, {c['series_usable']} usable",
            f"  slices       {c['slices']} selected, {c['slices_usable']} usable",
            f"  masks        {c['masks_found']} found, {c['masks_missing']} missing, "
            f"{c['masks_unusable']} unusable",
            f"  vendors      {_fmt_hist(a['vendors'])}",
            f"  models       {_fmt_hist(a['models'])}",
            f"  modalities   {_fmt_hist(a['modalities'])}",
            f"  orientation  {_fmt_hist(a['orientations'])}",
        ]
        if a["spacing_mm"]:
            lo, hi = a["spacing_mm"]["min"], a["spacing_mm"]["max"]
            lines.append("  spacing mm   " + ", ".join(
                f"{axis} {lo[i]:g}-{hi[i]:g}" for i, axis in enumerate(("slice", "row", "col"))))
        if a["intensity"]:
            i = a["intensity"]
            lines.append(f"  intensity    {i['min']:g} .. {i['max']:g} (p01 {i['p01']:g}, p99 {i['p99']:g})")
        if self.sync.series_listed is not None:
            lines.append(f"  PACS sync    {self.sync.series_fetched} series fetched "
                         f"({self.sync.instances_fetched} instances), {self.sync.series_unchanged} "
                         f"unchanged{', OFFLINE: cached data' if self.sync.offline else ''}")
        if self.series:
            lines += ["", "SERIES", f"  {'id':12} {'mod':4} {'slices':>6} {'seg':4} {'usable':6} "
                      f"{'vendor':20} folder / reason"]
            for s in self.series:
                tail = s.folder if s.selected else f"excluded: {s.excluded_reason}"
                lines.append(f"  {s.id[:12]:12} {s.modality[:4]:4} {s.slices:>6} "
                             f"{'yes' if s.has_seg else 'no':4} {'yes' if s.usable else 'no':6} "
                             f"{s.vendor[:20]:20} {tail}")
        pc = self.problem_counts()
        lines += ["", f"PROBLEMS ({len(self.problems)})"]
        lines += [f"  {kind:28} {n}" for kind, n in pc.items()]
        lines += [f"  {p.problem:28} {p.file}\n      {p.detail}" for p in self.problems]
        lines += ["", (f"RESULT: {c['series_usable']} usable series ({c['slices_usable']} slices) "
                       "to train on") if self.usable else "RESULT: NOTHING USABLE to train on"]
        return "\n".join(lines)


def _fmt_hist(hist: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in hist.items()) or "-"


# ---------------------------------------------------------------------------------- hashing


def manifest_key(site_name: str) -> bytes:
    """The site's secret HMAC key for manifests (``$FEDSEG_HOME/keys/<site>-manifest.key``).

    Created on first use (32 random bytes, mode 0600); it never leaves the site, so the
    coordinator cannot test a guessed UID against a manifest's hashes.
    """
    path = fedseg_home() / "keys" / f"{site_name}-manifest.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


class _Hasher:
    def __init__(self, key: bytes) -> None:
        self._key = key
        self.key_id = hashlib.sha256(b"fedseg-manifest-key-id:" + key).hexdigest()[:12]

    def __call__(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


# --------------------------------------------------------------------------------- checking


def _classify_scan_problem(problem: FileProblem) -> ProblemFile:
    reason = problem.reason
    if "is not a DICOM file" in reason:
        kind = NOT_DICOM
    elif "SEG" in reason:
        kind = BAD_SEG
    elif "is not an image" in reason and ("Image Storage)" in reason or "unknown SOP" in reason):
        # an image without its rows, or no SOP class at all: the header is cut or garbled
        kind, reason = UNREADABLE, f"{reason}: the header is incomplete (truncated or corrupt file)"
    elif "is not an image" in reason or "multi-frame" in reason:
        kind = UNSUPPORTED_OBJECT
    else:
        kind = UNREADABLE
    return ProblemFile(str(problem.path), kind, reason)


def _orientation(ds: Dataset) -> str:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return "unknown"
    normal = np.abs(np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float)))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _majority_outliers(values: list[Any]) -> tuple[Any, list[int]]:
    common = Counter(values).most_common(1)[0][0]
    return common, [i for i, v in enumerate(values) if v != common]


def _geometry_problems(headers: list[Dataset], files: Sequence[Path], folder: str) -> list[ProblemFile]:
    """Header-level checks: one size, orientation and pixel spacing; evenly spaced slices."""
    out: list[ProblemFile] = []

    def rounded(ds: Dataset, key: str) -> tuple | None:
        value = getattr(ds, key, None)
        return tuple(np.round(np.asarray(value, float), 3)) if value is not None else None

    for label, values in (
        ("size", [(getattr(ds, "Rows", None), getattr(ds, "Columns", None)) for ds in headers]),
        ("orientation", [rounded(ds, "ImageOrientationPatient") for ds in headers]),
        ("pixel spacing", [rounded(ds, "PixelSpacing") for ds in headers]),
    ):
        common, odd = _majority_outliers(values)
        out += [ProblemFile(str(files[i]), GEOMETRY,
                            f"{label} {values[i]} differs from the series' {common}") for i in odd]
    if out or len(headers) < 3:
        return out
    order = sort_slices(headers)
    positions = []
    for ds in (headers[i] for i in order):
        ipp, iop = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
        if ipp is None or iop is None:
            return out
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        positions.append(float(np.dot(np.asarray(ipp, float), normal)))
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        out.append(ProblemFile(folder, GEOMETRY, "two or more slices at the same position"))
    elif gaps.max() > 1.5 * gaps.min():
        out.append(ProblemFile(folder, GEOMETRY, f"uneven slice spacing ({gaps.min():.3g} to "
                                                 f"{gaps.max():.3g} mm): missing slices?"))
    return out


def _named_file(message: str, files: Sequence[Path], default: str) -> str:
    return next((str(f) for f in files if str(f) in message), default)


def _check_case(case: Case, facts: SeriesFacts, headers: list[Dataset]) -> list[ProblemFile]:
    """Read the series and its SEG like training does; fill ``facts``; return problems."""
    folder = facts.folder
    problems = _geometry_problems(headers, case.files, folder)
    undecodable = []
    for path, ds in zip(case.files, headers):
        try:
            check_decodable(ds, str(path))
        except UnsupportedTransferSyntaxError as exc:
            undecodable.append(ProblemFile(str(path), TRANSFER_SYNTAX, str(exc)))
    if undecodable:  # the series cannot be read: say which files, once each
        return problems + undecodable
    try:
        volume = read_series(case.files)
    except UnsupportedTransferSyntaxError as exc:
        return problems + [ProblemFile(_named_file(str(exc), case.files, folder), TRANSFER_SYNTAX,
                                       str(exc))]
    except SeriesError as exc:
        return problems + [ProblemFile(folder, GEOMETRY, str(exc))]
    except ImagingError as exc:
        return problems + [ProblemFile(_named_file(str(exc), case.files, folder), UNREADABLE, str(exc))]
    facts.readable = True
    facts.spacing_mm = tuple(round(float(v), 3) for v in volume.spacing)
    facts.rows, facts.cols = volume.shape[1:]
    px = volume.pixels
    p01, p99 = (float(v) for v in np.percentile(px, [1, 99]))
    facts.intensity = {"min": round(float(px.min()), 3), "max": round(float(px.max()), 3),
                       "p01": round(p01, 3), "p99": round(p99, 3)}
    if case.seg_file is None:
        problems.append(ProblemFile(folder, MISSING_SEG,
                                    f"no DICOM SEG references this series ({len(case.files)} slices); "
                                    "it cannot be used for training"))
        return problems
    try:
        read_seg_mask(case.seg_file, volume)
    except ImagingError as exc:
        problems.append(ProblemFile(str(case.seg_file), BAD_SEG, str(exc)))
    else:
        facts.mask_ok = True
    return problems


def check_site(site: Site) -> SiteCheck:
    """Sync ``site``'s source and check everything it offers; see the module docstring.

    Raises
    ------
    client.errors.SourceError
        The source cannot be read at all (missing folder, unreachable or refusing PACS).
    """
    source = site.data_source
    sync = source.sync()
    scan = scan_site(sync.folder)
    hasher = _Hasher(manifest_key(site.name))
    problems = [_classify_scan_problem(p) for p in scan.problems]
    series: list[SeriesFacts] = []
    for case in scan.cases:
        headers: list[Dataset] = []
        for path in case.files:
            try:
                headers.append(read_header(path))
            except DicomReadError as exc:  # the scan read it a moment ago: it changed since
                problems.append(ProblemFile(str(path), UNREADABLE, str(exc)))
        if len(headers) != len(case.files):
            continue
        first = headers[0]
        folder = os.path.commonpath([str(f) for f in case.files]) if len(case.files) > 1 \
            else str(case.files[0].parent)
        facts = SeriesFacts(
            id=hasher("series", case.series_uid),
            study=hasher("study", str(getattr(first, "StudyInstanceUID", "") or "")),
            patient=hasher("patient", case.patient_id),
            folder=folder,
            modality=case.modality or "unknown",
            description=case.series_description,
            vendor=str(getattr(first, "Manufacturer", "") or "unknown"),
            model=str(getattr(first, "ManufacturerModelName", "") or "unknown"),
            slices=len(case.files),
            has_seg=case.seg_file is not None,
            orientation=_orientation(first),
        )
        series.append(facts)
        reason = source.selection.reason_to_exclude(case.modality, case.series_description,
                                                    len(case.files))
        if reason is not None:
            facts.selected, facts.excluded_reason = False, reason
            continue
        problems += _check_case(case, facts, headers)
    problems.sort(key=lambda p: (PROBLEM_KINDS.index(p.problem), p.file))
    return SiteCheck(
        site=site.name, source_kind=source.kind, source=source.describe(),
        selection=source.selection.to_dict(), sync=sync, series=series, problems=problems,
        key_id=hasher.key_id,
    )
