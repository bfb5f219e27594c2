"""``fedseg simulate``: write virtual hospitals (synthetic or from the LGG set) and run
federations over them (``run``, defined in :mod:`simulation.run_command`)."""

from __future__ import annotations

from pathlib import Path

import click

from imaging.errors import ImagingError

from .run_command import run_command
from .sitedir import read_site_json

__all__ = ["simulate"]


@click.group("simulate")
def simulate() -> None:
    """Virtual hospitals: write site folders and run simulated federations."""


simulate.add_command(run_command)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise click.UsageError(f"--out {out} exists and is not empty; pass --force to overwrite sites")


def _report(site_dirs: list[Path]) -> None:
    for site in site_dirs:
        info = read_site_json(site)
        patients = int(info.get("patients", 0))
        positive = int(info.get("patients_with_lesions", 0))
        share = positive / patients if patients else 0.0
        vendor = " ".join(v for v in (info.get("manufacturer"), info.get("model")) if v) or "vendor unknown"
        click.echo(
            f"{site}: {info.get('modality', '?')}, {vendor}, {patients} patients, "
            f"{info.get('slices', 0)} slices, lesions in {positive}/{patients} patients "
            f"({share:.0%}), {info.get('lesion_slices', 0)} lesion slices"
        )


@simulate.command("sites")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Parent folder of the sites.")
@click.option("--sites", "n_sites", type=click.IntRange(min=1), required=True, help="Number of hospitals.")
@click.option("--patients", type=click.IntRange(min=1), default=6, show_default=True, help="Patients per site.")
@click.option("--slices", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per series.")
@click.option("--size", type=click.IntRange(min=32), default=64, show_default=True, help="Nominal matrix size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--force", is_flag=True, help="Replace site folders written earlier by a generator.")
def sites_command(out: Path, n_sites: int, patients: int, slices: int, size: int, seed: int, force: bool) -> None:
    """Write synthetic hospitals (DICOM series plus lesion SEGs) under OUT."""
    from .synthetic import write_synthetic_sites

    _check_out(out, force)
    try:
        written = write_synthetic_sites(out, n_sites, patients, slices, size, seed, overwrite=force)
    except ImagingError as exc:
        raise click.ClickException(str(exc)) from exc
    _report(written)


@simulate.command("import-lgg")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Parent folder of the sites.")
@click.option("--include-ez", is_flag=True, help="Merge EZ's single patient into the smallest site.")
@click.option("--site", "site_codes", multiple=True, help="Institution code to import (repeatable; default CS DU FG HT).")
@click.option("--max-patients", type=click.IntRange(min=1), default=None, help="Keep at most N patients per site.")
@click.option("--force", is_flag=True, help="Replace site folders written earlier by a generator.")
def import_lgg_command(
    src: Path, out: Path, include_ez: bool, site_codes: tuple[str, ...], max_patients: int | None, force: bool
) -> None:
    """Write the LGG FLAIR institutions in SRC (CS.npz, DU.npz, ...) as DICOM hospitals under OUT."""
    from .lgg import import_lgg

    _check_out(out, force)
    try:
        written = import_lgg(
            src,
            out,
            include_ez=include_ez,
            sites=list(site_codes) or None,
            max_patients_per_site=max_patients,
            overwrite=force,
        )
    except ImagingError as exc:
        raise click.ClickException(str(exc)) from exc
    _report(written)
