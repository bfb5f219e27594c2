"""Where a node's data lives: site-local facts from the node config, never from the run config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging.home import fedseg_home

from .errors import SiteConfigError

__all__ = ["Site", "SiteResolver", "site_from_node_config", "PartitionSites"]


@dataclass(frozen=True)
class Site:
    """A hospital's data folder, the name it reports metrics under, and its local cache."""

    data_dir: Path
    name: str
    cache_dir: Path | None = None  # preprocessed slices; None disables the cache
    policy_file: Path | None = None  # policy.toml; default: the one in data_dir, if any
    ledger_file: Path | None = None  # privacy ledger; default under $FEDSEG_HOME/ledgers

    @property
    def ledger_path(self) -> Path:
        return self.ledger_file or fedseg_home() / "ledgers" / f"{self.name}.json"

    @property
    def policy_path(self) -> Path:
        return self.policy_file or self.data_dir / "policy.toml"


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
    """A real SuperNode: ``--node-config "data-dir='/data/dicom' site-name='hospital-a'"``.

    Optional: ``cache-dir`` (default ``$FEDSEG_HOME/cache/site-datasets``; ``none`` disables
    it), ``policy-file`` (default ``<data-dir>/policy.toml``), ``ledger-file`` (default
    ``$FEDSEG_HOME/ledgers/<site-name>.json``).
    """
    raw = node_config.get("data-dir")
    if not raw:
        raise SiteConfigError(
            "node config lacks 'data-dir': start the SuperNode with "
            "--node-config \"data-dir='/path/to/dicom' site-name='my-hospital'\""
        )
    data_dir = Path(str(raw)).expanduser()
    if not data_dir.is_dir():
        raise SiteConfigError(f"data-dir {data_dir} is not a directory")
    name = str(node_config.get("site-name") or data_dir.name)
    return Site(data_dir=data_dir, name=name, cache_dir=_cache_dir(node_config),
                policy_file=_optional_path(node_config, "policy-file"),
                ledger_file=_optional_path(node_config, "ledger-file"))


@dataclass(frozen=True)
class PartitionSites:
    """Simulation: virtual node ``partition-id`` k reads only the k-th site folder."""

    site_dirs: Sequence[Path]

    def __call__(self, node_config: Mapping[str, Any]) -> Site:
        if "data-dir" in node_config:
            return site_from_node_config(node_config)
        try:
            index = int(node_config["partition-id"])
            data_dir = Path(self.site_dirs[index])
        except (KeyError, IndexError, ValueError) as exc:
            raise SiteConfigError(
                f"no site folder for virtual node {dict(node_config)!r} "
                f"({len(self.site_dirs)} sites)"
            ) from exc
        return Site(data_dir=data_dir, name=data_dir.name, cache_dir=_cache_dir(node_config))
