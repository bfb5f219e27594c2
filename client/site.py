"""Where a node's data lives: site-local facts from the node config, never from the run config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imaging.home import fedseg_home
from imaging.site_cache import load_site_dataset_cached
from imaging.site_data import SiteDataset
from imaging.spec import ModelSpec

from .errors import SiteConfigError
from .sources import DicomWebSource, FolderSource, SiteSource

__all__ = ["Site", "SiteResolver", "site_from_node_config", "PartitionSites"]


@dataclass(frozen=True)
class Site:
    """A hospital's data source, the name it reports metrics under, and its local files.

    Attributes
    ----------
    data_dir : Path
        The local DICOM folder: the folder source itself, or a PACS source's fetch cache.
    name : str
        The site's name (metrics, ledger and audit file names). The ledger is the site's: one
        budget per scope of its policy, whatever a run calls its consortium or model.
    cache_dir : Path or None
        Preprocessed slices; None disables that cache.
    policy_file, ledger_file, audit_file : Path or None
        Defaults: ``<data_dir>/policy.toml`` (``policy.toml`` beside ``site.toml`` for a site
        config), ``$FEDSEG_HOME/ledgers/<name>.json``, ``$FEDSEG_HOME/audit/<name>.jsonl``.
    source : SiteSource or None
        Where the DICOM comes from; None: the folder ``data_dir``, no selection rules.
    config_file : Path or None
        The ``site.toml`` this site was loaded from, if any.
    node_key : Path or None
        The node's EC private key (the one ``--auth-supernode-private-key`` loads), which signs
        every reply for the coordinator to check against the site's enrolment. A simulated site
        uses the key the simulation generated for it (:class:`PartitionSites`).
    """

    data_dir: Path
    name: str
    cache_dir: Path | None = None
    policy_file: Path | None = None
    ledger_file: Path | None = None
    source: SiteSource | None = None
    audit_file: Path | None = None
    config_file: Path | None = None
    node_key: Path | None = None

    @property
    def ledger_path(self) -> Path:
        return self.ledger_file or fedseg_home() / "ledgers" / f"{self.name}.json"

    @property
    def policy_path(self) -> Path:
        return self.policy_file or self.data_dir / "policy.toml"

    @property
    def audit_path(self) -> Path:
        return self.audit_file or fedseg_home() / "audit" / f"{self.name}.jsonl"

    @property
    def data_source(self) -> SiteSource:
        """The configured source, or the folder ``data_dir``."""
        return self.source or FolderSource(self.data_dir)

    def load_dataset(self, spec: ModelSpec, *, test_fraction: float, seed: int) -> SiteDataset:
        """Sync the source (a PACS fetches only what changed) and load its selected series.

        Preprocessed slices come from ``cache_dir`` when neither the files, the preprocessing,
        the split nor the selection rules changed.

        Raises
        ------
        client.errors.SourceError
            The source cannot be read (a missing folder, an unreachable or refusing PACS).
        imaging.errors.DataError
            No usable labelled series.
        """
        source = self.data_source
        report = source.sync()
        return load_site_dataset_cached(
            report.folder, spec, test_fraction=test_fraction, seed=seed,
            cache_dir=self.cache_dir, selection=source.selection,
        )


def _optional_path(node_config: Mapping[str, Any], key: str) -> Path | None:
    raw = str(node_config.get(key, "")).strip()
    return Path(raw).expanduser() if raw else None


def _cache_dir(node_config: Mapping[str, Any]) -> Path | None:
    raw = str(node_config.get("cache-dir", "")).strip()
    if raw.lower() == "none":
        return None
    return Path(raw).expanduser() if raw else fedseg_home() / "cache" / "site-datasets"


SiteResolver = Callable[[Mapping[str, Any]], Site]


def site_from_node_config(node_config: Mapping[str, Any]) -> Site:
    """A real SuperNode's site, from its ``--node-config``.

    Either ``site-config='/etc/fedseg/site.toml'`` (see :mod:`client.site_config`: folder or
    PACS source, selection rules, policy beside it), or the folder shortcut
    ``data-dir='/data/dicom' site-name='hospital-a'``, or ``pacs-url='http://pacs/dicom-web'
    site-name='hospital-a'`` (every series, credentials from the environment).

    Optional with the shortcuts: ``cache-dir`` (default ``$FEDSEG_HOME/cache/site-datasets``;
    ``none`` disables it), ``policy-file`` (default ``<data-dir>/policy.toml``), ``ledger-file``
    (default ``$FEDSEG_HOME/ledgers/<site-name>.json``).
    """
    given = [k for k in ("site-config", "data-dir", "pacs-url") if str(node_config.get(k, "")).strip()]
    node_key = _optional_path(node_config, "node-key")
    if len(given) > 1:
        raise SiteConfigError(f"node config gives {' and '.join(given)}: give only one of them")
    if given == ["site-config"]:
        from .site_config import load_site_config

        site = load_site_config(Path(str(node_config["site-config"])).expanduser())
        return replace(site, node_key=node_key) if node_key else site
    if given == ["pacs-url"]:
        name = str(node_config.get("site-name", "")).strip()
        if not name:
            raise SiteConfigError("node config with 'pacs-url' needs 'site-name' too")
        source = DicomWebSource(str(node_config["pacs-url"]),
                                cache_root=fedseg_home() / "cache" / "dicomweb" / name)
        return Site(data_dir=source.folder, name=name, cache_dir=_cache_dir(node_config),
                    policy_file=_optional_path(node_config, "policy-file"),
                    ledger_file=_optional_path(node_config, "ledger-file"), source=source, node_key=node_key)
    if not given:
        raise SiteConfigError(
            "node config lacks 'data-dir' or 'site-config': start the SuperNode with "
            "--node-config \"site-config='/etc/fedseg/site.toml'\" or "
            "--node-config \"data-dir='/path/to/dicom' site-name='my-hospital'\""
        )
    data_dir = Path(str(node_config["data-dir"])).expanduser()
    if not data_dir.is_dir():
        raise SiteConfigError(f"data-dir {data_dir} is not a directory")
    name = str(node_config.get("site-name") or data_dir.name)
    return Site(data_dir=data_dir, name=name, cache_dir=_cache_dir(node_config),
                policy_file=_optional_path(node_config, "policy-file"),
                ledger_file=_optional_path(node_config, "ledger-file"), node_key=node_key)


@dataclass(frozen=True)
class PartitionSites:
    """Simulation: virtual node ``partition-id`` k reads only the k-th site folder."""

    site_dirs: Sequence[Path]
    node_keys: Sequence[Path] = ()  # the k-th site's node key (simulation.enrolment), if any

    def __call__(self, node_config: Mapping[str, Any]) -> Site:
        if any(k in node_config for k in ("data-dir", "site-config", "pacs-url")):
            return site_from_node_config(node_config)
        try:
            index = int(node_config["partition-id"])
            data_dir = Path(self.site_dirs[index])
        except (KeyError, IndexError, ValueError) as exc:
            raise SiteConfigError(
                f"no site folder for virtual node {dict(node_config)!r} "
                f"({len(self.site_dirs)} sites)"
            ) from exc
        key = self.node_keys[index] if index < len(self.node_keys) else None
        return Site(data_dir=data_dir, name=data_dir.name, cache_dir=_cache_dir(node_config), node_key=key)
