"""Synthetic hospitals written as real DICOM: phantom series plus lesion SEGs.

Each site has one scanner (modality, vendor tags, matrix, pixel spacing, slice thickness, noise,
intensity calibration) and its own lesion statistics (prevalence, lesions per patient, size), so
sites are non-IID the way hospitals are. A patient is a textured "body" ellipsoid with 0..k
bright or dark ellipsoid lesions whose contrast is several times the noise, so that a small 2-D
U-Net learns them in a few epochs. Everything is a function of ``seed`` (UIDs included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imaging.dicom_seg import write_seg
from imaging.dicom_write import write_series
from imaging.errors import ConfigError

from .sitedir import check_site_dirs, patient_dirs, prepare_site_dir, site_letters, write_site_json

__all__ = ["SiteParams", "site_params", "phantom", "write_synthetic_sites"]

# fictitious vendors: (Manufacturer, ManufacturerModelName)
_SCANNERS = (
    ("Acme Medical", "Aurora 3T"),
    ("Borealis Imaging", "Polaris CT 64"),
    ("Cobalt Systems", "Cobalt MR 1.5"),
    ("Delta Diagnostics", "DeltaScan 128"),
    ("Equinox Health", "Equinox Vista"),
)


@dataclass(frozen=True)
class SiteParams:
    """The scanner and population of one synthetic site (written to ``site.json``)."""

    site: str
    modality: str
    manufacturer: str
    model: str
    rows: int
    cols: int
    fov_mm: float
    slice_thickness_mm: float
    noise: float  # Gaussian noise SD relative to the body's signal
    intensity_scale: float
    intensity_offset: float
    lesion_prevalence: float  # share of patients with at least one lesion
    max_lesions: int
    lesion_radius_mm: float
    bright_share: float  # share of lesions brighter than the body

    @property
    def pixel_spacing_mm(self) -> float:
        return self.fov_mm / self.rows


def site_params(index: int, *, size: int = 64, seed: int = 0) -> SiteParams:
    """Draw the scanner and population parameters of site ``index`` (deterministic)."""
    rng = np.random.default_rng([seed, index, 1])
    modality = "MR" if index % 2 == 0 else "CT"
    manufacturer, model = _SCANNERS[index % len(_SCANNERS)]
    matrix = max(32, int(round(size * rng.uniform(0.875, 1.125) / 4)) * 4)  # e.g. 56..72
    if modality == "MR":
        scale, offset = rng.uniform(400, 1200), rng.uniform(0, 150)
    else:  # HU = -1000 + offset + scale * signal: body at about 0..80 HU
        scale, offset = rng.uniform(1000, 1080), rng.uniform(-20, 20)
    return SiteParams(
        site=f"site-{site_letters(index)}",
        modality=modality,
        manufacturer=manufacturer,
        model=model,
        rows=matrix,
        cols=matrix,
        fov_mm=round(float(rng.uniform(200, 260)), 1),
        slice_thickness_mm=float(rng.choice([2.5, 3.0, 4.0, 5.0])),
        noise=round(float(rng.uniform(0.02, 0.08)), 4),
        intensity_scale=round(float(scale), 2),
        intensity_offset=round(float(offset), 2),
        lesion_prevalence=round(float(rng.uniform(0.6, 0.95)), 3),
        max_lesions=int(rng.integers(1, 4)),
        lesion_radius_mm=round(float(rng.uniform(18, 30)), 1),
        bright_share=round(float(rng.uniform(0.6, 1.0)), 3),
    )


def phantom(
    p: SiteParams, slices: int, n_lesions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One patient: stored pixel values (int) and the lesion mask, both ``(slices, rows, cols)``.

    The signal is 0 outside the body, about 1 inside, +0.5..0.8 (bright) or -0.4..-0.5 (dark)
    in lesions; the site's noise, scale and offset are applied last.
    """
    sp = p.pixel_spacing_mm
    z = (np.arange(slices) - (slices - 1) / 2) * p.slice_thickness_mm
    y = (np.arange(p.rows) - (p.rows - 1) / 2) * sp
    x = (np.arange(p.cols) - (p.cols - 1) / 2) * sp
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")

    # body: an ellipsoid that reaches past the first and last slices
    ax, ay = rng.uniform(0.32, 0.42) * p.fov_mm, rng.uniform(0.25, 0.35) * p.fov_mm
    az = rng.uniform(0.6, 0.8) * slices * p.slice_thickness_mm
    cx, cy = rng.uniform(-0.05, 0.05, size=2) * p.fov_mm
    body_r = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 + (Z / az) ** 2
    body = body_r <= 1.0

    # smooth texture: a few low-frequency waves (wavelengths 40..120 mm)
    texture = np.zeros(Z.shape)
    for _ in range(3):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (np.linalg.norm(k) * rng.uniform(40, 120))
        texture += rng.uniform(0.02, 0.04) * np.sin(k[0] * Z + k[1] * Y + k[2] * X + rng.uniform(0, 6.3))
    signal = np.where(body, 1.0 + texture, 0.0)

    mask = np.zeros(Z.shape, dtype=bool)
    for _ in range(n_lesions):
        # a centre well inside the body, radii around the site's lesion size
        u = rng.normal(size=3)
        u *= rng.uniform(0.0, 0.55) / np.linalg.norm(u)
        lz, ly, lx = u[0] * az * 0.6, cy + u[1] * ay, cx + u[2] * ax
        r = p.lesion_radius_mm * rng.uniform(0.7, 1.3)
        rx, ry, rz = r * rng.uniform(0.8, 1.2, size=3)
        lesion = ((X - lx) / rx) ** 2 + ((Y - ly) / ry) ** 2 + ((Z - lz) / rz) ** 2 <= 1.0
        lesion &= body
        contrast = rng.uniform(0.5, 0.8) if rng.random() < p.bright_share else -rng.uniform(0.4, 0.5)
        signal = np.where(lesion & ~mask, signal + contrast, signal)
        mask |= lesion

    noisy = signal + rng.normal(0.0, p.noise, size=signal.shape)
    if p.modality == "MR":  # magnitude images: non-negative
        stored = np.abs(p.intensity_offset + p.intensity_scale * noisy)
    else:  # stored = HU + 1024 (RescaleIntercept -1024)
        stored = 24.0 + p.intensity_offset + p.intensity_scale * noisy
    stored = np.clip(np.round(stored), 0, 4095).astype(np.uint16)
    return stored, mask.astype(np.uint8)


def write_synthetic_sites(
    out: Path,
    sites: int,
    patients_per_site: int = 6,
    slices: int = 16,
    size: int = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``sites`` synthetic hospitals under ``out`` as DICOM series plus SEGs.

    Parameters
    ----------
    out : Path
        Parent folder; each site is ``out/site-a``, ``out/site-b``, ...
    sites, patients_per_site, slices : int
        Counts (each >= 1).
    size : int
        Nominal matrix; each site's rows/cols vary around it (multiples of 4, e.g. 56..72).
    seed : int
        Everything (pixels, parameters, UIDs) is a function of the seed.
    overwrite : bool
        Replace site folders previously written by a generator.

    Returns
    -------
    list[Path]
        The site folders.

    Raises
    ------
    ConfigError
        A count out of range.
    DataError
        A site folder exists and is not empty (and ``overwrite`` is off or it is not ours).
    """
    for name, value, low in (("sites", sites, 1), ("patients_per_site", patients_per_site, 1),
                             ("slices", slices, 1), ("size", size, 32)):
        if int(value) < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    out = Path(out)
    params = [site_params(s, size=size, seed=seed) for s in range(sites)]
    check_site_dirs([out / p.site for p in params], overwrite=overwrite)
    written: list[Path] = []
    for s, p in enumerate(params):
        site_dir = prepare_site_dir(out / p.site, overwrite=overwrite)
        letter = site_letters(s).upper()
        rng = np.random.default_rng([seed, s, 2])
        # a fixed number of lesion patients (at least one), assigned at random
        n_pos = min(patients_per_site, max(1, int(round(p.lesion_prevalence * patients_per_site))))
        positive = set(rng.permutation(patients_per_site)[:n_pos].tolist())
        lesion_slices = 0
        for i in range(patients_per_site):
            prng = np.random.default_rng([seed, s, 3, i])
            n_lesions = int(prng.integers(1, p.max_lesions + 1)) if i in positive else 0
            stored, mask = phantom(p, slices, n_lesions, prng)
            pid = f"SYN-{letter}{i + 1:03d}"
            series_dir, seg_path = patient_dirs(site_dir, pid)
            uid_seed = f"fedseg-synthetic/{seed}/{p.site}/{pid}"
            files = write_series(
                series_dir,
                stored,
                patient_id=pid,
                patient_name=f"SYN^{letter}{i + 1:03d}",
                modality=p.modality,
                spacing=(p.slice_thickness_mm, p.pixel_spacing_mm, p.pixel_spacing_mm),
                manufacturer=p.manufacturer,
                model=p.model,
                institution=f"Synthetic Hospital {letter}",
                series_description="synthetic phantom",
                rescale_intercept=-1024.0 if p.modality == "CT" else 0.0,
                study_date=f"2024{1 + i % 12:02d}{1 + i % 28:02d}",
                uid_seed=uid_seed,
            )
            write_seg(seg_path, files, mask, algorithm_name="fedseg synthetic phantom",
                      uid_seed=uid_seed)
            lesion_slices += int(mask.any(axis=(1, 2)).sum())
        write_site_json(site_dir, {
            "source": "synthetic",
            "generator": "simulation.synthetic",
            "seed": seed,
            "slices_per_patient": slices,
            **asdict(p),
            "pixel_spacing_mm": round(p.pixel_spacing_mm, 4),
            "patients": patients_per_site,
            "slices": patients_per_site * slices,
            "patients_with_lesions": n_pos,
            "lesion_slices": lesion_slices,
        })
        written.append(site_dir)
    return written
