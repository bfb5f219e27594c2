"""Everything a governance dossier states about one registered version, read once.

:func:`collect_facts` is the only part of the dossier that talks to MLflow; the rest works on
the :class:`DossierFacts` it returns (and tests build facts by hand).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .comments import COMMENT_TAG_PREFIX, Comment, comments_from_tags
from .errors import ModelNotFoundError
from .evidence import VerifiedVersion, verify_version
from .run_history import History, fetch_history
from .store import RegistryStore

__all__ = ["DossierFacts", "collect_facts", "JSON_TAGS", "get_version", "public_uri"]

# Same prefix as registry.publish.METRIC_PREFIX; not imported, because publish imports the dossier.
_METRIC_PREFIX = "metric."

# Lineage tags whose values are JSON documents.
JSON_TAGS = (
    "sites",
    "strategy_params",
    "preprocessing",
    "eval_sites",
    "eval_sites_uncounted",
    "eval_sites_local_norm",
    "dp",
    "epsilon_sites",
    "site_manifests",
    "site_inputs",
    "input_reference",
)


@dataclass(frozen=True)
class DossierFacts:
    """A version's registry entry, its training run and its comments.

    ``tags`` are the version's raw tags (comments included); ``lineage`` holds the JSON tags of
    :data:`JSON_TAGS` decoded (absent ones are missing, unreadable ones listed in ``problems``).
    """

    name: str
    version: int
    aliases: tuple[str, ...] = ()
    run_id: str | None = None
    created_at: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    history: History = field(default_factory=dict)
    comments: tuple[Comment, ...] = ()
    tracking_uri: str = ""
    generated_at: str = ""
    problems: tuple[str, ...] = ()
    verified: VerifiedVersion | None = None  # what vouches for the facts; None: not checked

    def tag(self, key: str, default: str | None = None) -> str | None:
        return self.tags.get(key, default)

    @property
    def lineage_tags(self) -> dict[str, str]:
        """Version tags other than comments and metrics."""
        return {
            k: v
            for k, v in self.tags.items()
            if not k.startswith(COMMENT_TAG_PREFIX) and not k.startswith(_METRIC_PREFIX)
        }


def get_version(client: MlflowClient, name: str, version: int | str):  # -> mlflow ModelVersion
    """The ModelVersion ``version`` (a number, or an alias such as ``champion``) of ``name``."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no registered model {name!r}") from exc
    ref = str(version).strip()
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        known = sorted(model.aliases)
        hint = f" (aliases: {', '.join(known)})" if known else ""
        raise ModelNotFoundError(f"registered model {name!r} has no version {ref!r}{hint}") from exc


def collect_facts(
    store: RegistryStore, name: str, version: int | str, *, verify: bool = True
) -> DossierFacts:
    """Read the version's tags, aliases, run params, per-round metric histories and comments.

    With ``verify`` (the default) the version's signed evidence is checked first
    (:func:`registry.evidence.verify_version`): a dossier is never built from an edited tag, a
    re-registered artifact or an edited logged dossier. A version published before evidence
    existed is accepted, and its dossier says that its facts are not signed. Publication itself
    builds the first dossier with ``verify=False``: the evidence is signed after it, over it.

    Raises
    ------
    ModelNotFoundError
        Unknown model, version or alias.
    EvidenceError
        The version does not match its signed evidence (the message names each difference).
    """
    client = store.client()
    mv = get_version(client, name, version)
    number = int(mv.version)
    aliases = tuple(
        sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(number))
    )
    tags = dict(mv.tags)
    lineage: dict[str, Any] = {}
    problems: list[str] = []
    verified = None
    if verify:
        verified = verify_version(store, mv.name, number, model_version=mv, allow_legacy=True)
        tags = dict(verified.tags)
        if verified.legacy:
            problems.append(f"the facts below are not signed: {verified.describe()}")
    for key in JSON_TAGS:
        if key in tags:
            try:
                lineage[key] = json.loads(tags[key])
            except ValueError:
                problems.append(f"tag {key} is not valid JSON")
    metrics: dict[str, float] = {}
    for key, raw in tags.items():
        if key.startswith(_METRIC_PREFIX):
            try:
                metrics[key[len(_METRIC_PREFIX):]] = float(raw)
            except ValueError:
                problems.append(f"tag {key} is not a number")
    run_id = mv.run_id or tags.get("run_id") or None
    params: dict[str, str] = {}
    history: History = {}
    if run_id:
        try:
            params = dict(client.get_run(run_id).data.params)
            history = fetch_history(client, run_id)
        except MlflowException:
            problems.append(f"training run {run_id} is not in the tracking store")
    else:
        problems.append("the version names no training run")
    return DossierFacts(
        name=mv.name,
        version=number,
        aliases=aliases,
        run_id=run_id,
        created_at=_iso_ms(mv.creation_timestamp),
        tags=tags,
        lineage=lineage,
        metrics=metrics,
        params=params,
        history=history,
        comments=tuple(comments_from_tags(tags)),
        tracking_uri=public_uri(store.tracking_uri),
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        problems=tuple(problems),
        verified=verified,
    )


def public_uri(uri: str) -> str:
    """``uri`` without user name or password, fit to print."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _iso_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
