"""Simulated sites enrol the way hospitals do, so the coordinator's identity checks run unchanged.

For each site folder the simulation makes a node key (``fedseg pki site-key``'s function), writes
the site's manifest with ``fedseg site check``'s function, signs it with that key and enrols it in
a fresh enrolment directory that the ServerApp reads through ``$FEDSEG_ENROLMENT_DIR``. Every
virtual node then signs its replies with its own key (:class:`client.site.PartitionSites`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from client.site import Site
from client.site_check import check_site
from privacy.enrolment import ENROLMENT_DIR_ENV, EnrolledSites, sign_manifest, write_enrolment
from privacy.pki import create_site_key

__all__ = ["enrol_sites", "simulated_enrolment"]


def enrol_sites(site_dirs: Sequence[Path], work_dir: Path) -> tuple[EnrolledSites, list[Path]]:
    """Keys under ``work_dir/keys``, enrolments under ``work_dir/enrolment``; the node keys in order."""
    keys: list[Path] = []
    for folder in site_dirs:
        name = Path(folder).name
        key = create_site_key(work_dir / "keys", name).private_key_path
        manifest = check_site(Site(data_dir=Path(folder), name=name, cache_dir=None)).manifest()
        write_enrolment(sign_manifest(manifest, key, name), work_dir / "enrolment" / f"{name}.json")
        keys.append(key)
    return EnrolledSites.load(work_dir / "enrolment"), keys


@contextmanager
def simulated_enrolment(site_dirs: Sequence[Path]) -> Iterator[list[Path]]:
    """Enrol ``site_dirs`` for one simulation; ``$FEDSEG_ENROLMENT_DIR`` points at them meanwhile."""
    previous = os.environ.get(ENROLMENT_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="fedseg-enrolment-") as work:
        _, keys = enrol_sites(site_dirs, Path(work))
        os.environ[ENROLMENT_DIR_ENV] = str(Path(work) / "enrolment")
        try:
            yield keys
        finally:
            if previous is None:
                os.environ.pop(ENROLMENT_DIR_ENV, None)
            else:
                os.environ[ENROLMENT_DIR_ENV] = previous
