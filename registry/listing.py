"""Listing registered versions with their aliases, metrics and lineage tags."""

from __future__ import annotations

from typing import Any

from .publish import METRIC_PREFIX
from .store import RegistryStore

__all__ = ["list_versions"]


def list_versions(store: RegistryStore, name: str | None = None) -> list[dict[str, Any]]:
    """One dict per version: ``name``, ``version``, ``aliases``, ``metrics``, ``tags``."""
    client = store.client()
    query = f"name='{name}'" if name else ""
    rows = []
    aliases: dict[str, dict[str, list[str]]] = {}
    for v in client.search_model_versions(query):
        if v.name not in aliases:  # search results carry no aliases: ask the model once
            by_version: dict[str, list[str]] = {}
            for alias, ver in client.get_registered_model(v.name).aliases.items():
                by_version.setdefault(str(ver), []).append(alias)
            aliases[v.name] = by_version
        tags = dict(v.tags)
        rows.append(
            {
                "name": v.name,
                "version": int(v.version),
                "aliases": sorted(aliases[v.name].get(str(v.version), [])),
                "metrics": {
                    k[len(METRIC_PREFIX):]: float(val)
                    for k, val in tags.items()
                    if k.startswith(METRIC_PREFIX)
                },
                "tags": {k: val for k, val in tags.items() if not k.startswith(METRIC_PREFIX)},
                "run_id": v.run_id,
                "created": v.creation_timestamp,
            }
        )
    return sorted(rows, key=lambda r: (r["name"], r["version"]))
