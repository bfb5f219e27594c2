"""Import the LGG FLAIR 128x128 set (one ``.npz`` per TCGA institution) as DICOM hospitals.

Each institution becomes a site folder ``out/lgg-<code>`` in the layout of
:mod:`simulation.sitedir`: per patient an MR series ordered by ``slice_index`` and a SEG made from
the hand-drawn mask. The source carries no geometry, so spacing is assumed (2 mm in-plane, 3 mm
slices) and every instance is marked ``geometry assumed``. The TCGA case id (public,
de-identified) is the PatientID; its date part is the StudyDate.

EZ holds a single patient, too few for a site: it is left out by default; with
``include_ez=True`` its patient joins the selected site with the fewest patients (CS for the
full set), recorded under ``merged_from`` in that site's ``site.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imaging.dicom_seg import write_seg
from imaging.dicom_write import write_series
from imaging.errors import ConfigError, DataError

from .sitedir import check_site_dirs, patient_dirs, prepare_site_dir, write_site_json

__all__ = ["LGG_SITES", "LGG_SPACING_MM", "import_lgg"]

#: The institutions large enough to be sites on their own.
LGG_SITES: tuple[str, ...] = ("CS", "DU", "FG", "HT")
#: Assumed (slice, row, col) spacing in mm of the 128x128 images.
LGG_SPACING_MM: tuple[float, float, float] = (3.0, 2.0, 2.0)
_SMALL_SITE = "EZ"
_KEYS = ("image", "mask", "patient", "slice_index")

_Patient = tuple[str, np.ndarray, np.ndarray]  # case id, image (S,H,W), mask (S,H,W)


def _load_site(src: Path, code: str) -> list[_Patient]:
    path = src / f"{code}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found (expected one .npz per institution in {src})")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _KEYS if k not in data.files]
        if missing:
            raise DataError(f"{path} lacks arrays {missing}")
        image, mask = data["image"], data["mask"]
        patient, slice_index = data["patient"].astype(str), data["slice_index"]
    patients: list[_Patient] = []
    for case in sorted(set(patient.tolist())):
        rows = np.flatnonzero(patient == case)
        rows = rows[np.argsort(slice_index[rows], kind="stable")]
        patients.append((case, image[rows], mask[rows]))
    return patients


def _study_date(case: str) -> str:
    tail = case.rsplit("_", 1)[-1]
    return tail if len(tail) == 8 and tail.isdigit() else ""


def import_lgg(
    src: Path,
    out: Path,
    *,
    include_ez: bool = False,
    sites: Sequence[str] | None = None,
    max_patients_per_site: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the LGG institutions as DICOM site folders.

    Parameters
    ----------
    src : Path
        The folder holding ``CS.npz``, ``DU.npz``, ``EZ.npz``, ``FG.npz`` and ``HT.npz``.
    out : Path
        Parent folder; sites are written to ``out/lgg-<code>``.
    include_ez : bool
        Merge EZ's single patient into the selected site with the fewest patients (ties: first
        in order). The ``max_patients_per_site`` cap applies after merging, EZ last.
    sites : sequence of str, optional
        Institution codes to import (default :data:`LGG_SITES`). Naming ``"EZ"`` here imports it
        as a site of its own.
    max_patients_per_site : int, optional
        Keep only the first patients (by case id) of each site, e.g. for tests.
    overwrite : bool
        Replace site folders previously written by a generator.

    Returns
    -------
    list[Path]
        The site folders, in ``sites`` order.

    Raises
    ------
    ConfigError
        Unknown site codes or a cap below 1.
    DataError
        ``src`` or a ``.npz`` missing or malformed; an output site folder exists and is not empty.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"LGG source folder {src} does not exist")
    codes = [c.upper() for c in (sites if sites is not None else LGG_SITES)]
    unknown = sorted(set(codes) - set(LGG_SITES) - {_SMALL_SITE})
    if unknown or not codes:
        raise ConfigError(f"unknown LGG sites {unknown}; choose from {[*LGG_SITES, _SMALL_SITE]}")
    if max_patients_per_site is not None and max_patients_per_site < 1:
        raise ConfigError(f"max_patients_per_site must be >= 1, got {max_patients_per_site}")

    loaded = {code: _load_site(src, code) for code in dict.fromkeys(codes)}
    merged: dict[str, list[str]] = {code: [] for code in loaded}
    if include_ez and _SMALL_SITE not in loaded:
        target = min(loaded, key=lambda c: len(loaded[c]))
        loaded[target] = loaded[target] + _load_site(src, _SMALL_SITE)
        merged[target].append(_SMALL_SITE)

    check_site_dirs([out / f"lgg-{code}" for code in loaded], overwrite=overwrite)
    written: list[Path] = []
    for code, patients in loaded.items():
        patients = patients[:max_patients_per_site] if max_patients_per_site else patients
        site_dir = prepare_site_dir(out / f"lgg-{code}", overwrite=overwrite)
        slices = lesion_slices = positive = 0
        for case, image, mask in patients:
            series_dir, seg_path = patient_dirs(site_dir, case)
            uid_seed = f"fedseg-lgg/{case}"
            files = write_series(
                series_dir,
                image.astype(np.uint16),
                patient_id=case,
                patient_name=f"{case}^",  # one-component person name (trailing caret)
                modality="MR",
                spacing=LGG_SPACING_MM,
                institution=f"TCGA-LGG {code}",
                series_description="FLAIR (LGG kaggle_3m, 128x128)",
                geometry_assumed=True,
                study_date=_study_date(case),
                uid_seed=uid_seed,
            )
            write_seg(seg_path, files, mask, label="FLAIR abnormality", uid_seed=uid_seed)
            per_slice = mask.reshape(len(mask), -1).any(axis=1)
            slices += len(mask)
            lesion_slices += int(per_slice.sum())
            positive += int(per_slice.any())
        write_site_json(site_dir, {
            "source": "lgg-flair128",
            "generator": "simulation.lgg",
            "site": f"lgg-{code}",
            "institution": code,
            "merged_from": merged.get(code, []),
            "modality": "MR",
            "manufacturer": "",
            "spacing_mm_assumed": list(LGG_SPACING_MM),
            "patients": len(patients),
            "slices": slices,
            "patients_with_lesions": positive,
            "lesion_slices": lesion_slices,
        })
        written.append(site_dir)
    return written
