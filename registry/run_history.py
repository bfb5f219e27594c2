"""A training run's per-round metric histories, and the per-site series inside them.

The coordinator logs one MLflow metric per key with ``step = round``: site metrics as
``site/<site>/<phase>/<key>`` (phase ``train`` or ``evaluate``), federation summaries as
``eval/<key>``. This module fetches them once and answers questions about them; it draws nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mlflow.tracking import MlflowClient

__all__ = ["History", "Series", "fetch_history", "site_series", "last_value", "site_metric_keys"]

Series = tuple[tuple[int, float], ...]  # (round, value), ordered by round
History = Mapping[str, Series]

_SITE_KEY = re.compile(r"^site/(?P<site>.+)/(?P<phase>train|evaluate)/(?P<key>[^/]+)$")


def fetch_history(client: MlflowClient, run_id: str) -> dict[str, Series]:
    """Every metric of the run as a round-ordered series (the latest value wins within a round)."""
    run = client.get_run(run_id)
    history: dict[str, Series] = {}
    for key in sorted(run.data.metrics):
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            previous = by_step.get(m.step)
            if previous is None or m.timestamp >= previous[0]:
                by_step[m.step] = (m.timestamp, float(m.value))
        history[key] = tuple((step, value) for step, (_, value) in sorted(by_step.items()))
    return history


def site_series(history: History, phase: str, key: str) -> dict[str, Series]:
    """``{site: series}`` of ``site/<site>/<phase>/<key>``, sites sorted by name."""
    found: dict[str, Series] = {}
    for metric, series in history.items():
        match = _SITE_KEY.match(metric)
        if match and match["phase"] == phase and match["key"] == key and series:
            found[match["site"]] = tuple(series)
    return dict(sorted(found.items()))


def site_metric_keys(history: History) -> set[str]:
    """The metric names (``dice``, ``train-loss``, ...) that sites reported, over both phases."""
    return {m["key"] for k in history if (m := _SITE_KEY.match(k))}


def last_value(series: Sequence[tuple[int, float]] | None) -> float | None:
    """The value of the latest round, or None for an absent or empty series."""
    return float(series[-1][1]) if series else None
