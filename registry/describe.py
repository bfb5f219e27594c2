"""One registered version's lineage, decoded: what ``fedseg registry show`` prints."""

from __future__ import annotations

import json
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import ModelNotFoundError
from .history import read_history
from .publish import METRIC_PREFIX
from .store import RegistryStore

__all__ = ["describe_version", "decode_tag"]


def decode_tag(value: str) -> Any:
    """A tag value with JSON objects and arrays decoded; anything else stays a string."""
    text = value.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return value
    return value


def describe_version(store: RegistryStore, name: str, version: int) -> dict[str, Any]:
    """The version's lineage as a JSON-ready dict.

    Returns
    -------
    dict
        ``name``, ``version``, ``aliases``, ``run_id``, ``created`` (ms since the epoch),
        ``metrics`` (from ``metric.*`` tags, as floats), ``lineage`` (every other tag, JSON
        objects and arrays decoded) and ``champion_history`` (the model's, oldest first).

    Raises
    ------
    ModelNotFoundError
        No such model or version.
    """
    client = store.client()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no registered model {name!r} at {store.tracking_uri}") from exc
    try:
        mv = client.get_model_version(name, str(int(version)))
    except MlflowException as exc:
        raise ModelNotFoundError(f"models:/{name}/{version} is not in the registry at {store.tracking_uri}") from exc
    tags = dict(mv.tags)
    metrics: dict[str, Any] = {}
    for key, raw in tags.items():
        if key.startswith(METRIC_PREFIX):
            try:
                metrics[key[len(METRIC_PREFIX):]] = float(raw)
            except ValueError:
                metrics[key[len(METRIC_PREFIX):]] = raw
    return {
        "name": name,
        "version": int(mv.version),
        "aliases": sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(mv.version)),
        "run_id": mv.run_id,
        "created": mv.creation_timestamp,
        "metrics": dict(sorted(metrics.items())),
        "lineage": {k: decode_tag(v) for k, v in sorted(tags.items()) if not k.startswith(METRIC_PREFIX)},
        "champion_history": read_history(store, name),
    }
