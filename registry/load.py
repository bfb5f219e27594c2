"""Loading a registered version for serving: its weights, spec and metadata."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException

from imaging.errors import ConfigError
from imaging.spec import ModelSpec

from .artifacts import SPEC_FILE, STATE_FILE
from .errors import (
    EvidenceError,
    ModelArtifactError,
    ModelNotFoundError,
    ModelSignatureError,
    RegistryError,
)
from .evidence import Evidence, verify_version
from .fetch import MLMODEL_FILE, download_model_dir
from .publish import METRIC_PREFIX
from .signing import Signature, TrustedKeys, verify_model_dir
from .store import RegistryStore
from .uri import parse_model_uri

__all__ = ["LoadedModel", "load_model", "resolve_version"]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    signature: Signature | None = None  # None only when loaded with verify=False
    evidence: Evidence | None = None  # what the tags were checked against (None: verify=False)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            k[len(METRIC_PREFIX):]: float(v) for k, v in self.tags.items() if k.startswith(METRIC_PREFIX)
        }


#: What MLflow answers when a model, version or alias is not there; any other error means the
#: registry could not say, which is not the same as "there is none".
_MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def lookup_error(exc: MlflowException, missing: str) -> RegistryError:
    """``ModelNotFoundError(missing)`` when MLflow answered "not there", else "cannot ask"."""
    if getattr(exc, "error_code", None) in _MISSING_CODES:
        return ModelNotFoundError(missing)
    return RegistryError(f"cannot ask the registry: {exc}")


def resolve_version(store: RegistryStore, uri: str):  # -> mlflow ModelVersion
    """The ModelVersion a ``models:/`` URI names now.

    Raises
    ------
    ModelNotFoundError
        The registry answered that the model, the alias or the version is not there (the
        message says which).
    RegistryError
        The registry could not be asked (unreachable, failing); nothing is known.
    """
    ref = parse_model_uri(uri)
    client = store.client()
    missing = f"{ref} is not in the registry at {store.tracking_uri}"
    version = ref.version
    if ref.alias is not None:
        try:
            aliases = client.get_registered_model(ref.name).aliases or {}
        except MlflowException as exc:
            raise lookup_error(exc, f"{missing}: no registered model {ref.name!r}") from exc
        if ref.alias not in aliases:
            raise ModelNotFoundError(f"{missing}: {ref.name} has no alias {ref.alias!r}")
        version = aliases[ref.alias]
    try:
        return client.get_model_version(ref.name, str(version))
    except MlflowException as exc:
        raise lookup_error(exc, missing) from exc


def load_model(
    store: RegistryStore,
    uri: str,
    *,
    verify: bool = True,
    trusted_keys: TrustedKeys | Iterable[Any] | None = None,
) -> LoadedModel:
    """Download the version, verify its signature and evidence, read ``state_dict.pt`` and ``spec.json``.

    Parameters
    ----------
    store : RegistryStore
    uri : str
        ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
    verify : bool
        Refuse a model directory that is not, byte for byte, what a trusted key signed, and a
        version that does not match its signed evidence (:mod:`registry.evidence`: an edited
        tag, an artifact registered again as another version or under another name, weights
        swapped for other signed ones), or that predates evidence (default). The weights and
        spec are then read from the very bytes whose digests were verified, and ``tags`` is the
        snapshot that was checked.
    trusted_keys : optional
        Public keys (or paths) to trust; default ``FEDSEG_TRUSTED_KEYS`` or
        ``$FEDSEG_HOME/keys/trusted/``.

    Raises
    ------
    ModelSignatureError
        The signature is missing, does not verify, or is by an untrusted key (the message says which).
    EvidenceError
        The version does not match its signed evidence, has none, or has it in the old format
        (the message names each difference).
    """
    version = resolve_version(store, uri)
    label = f"{uri} ({version.name} version {version.version})"
    signature: Signature | None = None
    evidence: Evidence | None = None
    tags = dict(version.tags)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_dir, found = download_model_dir(store, version.source, Path(tmp))
        except ModelArtifactError as exc:
            raise ModelArtifactError(f"{uri}: {exc}") from exc
        if verify:
            if not found:
                raise ModelSignatureError(f"refusing {label}: no {MLMODEL_FILE}, not a model directory")
            try:
                signature = verify_model_dir(model_dir, trusted_keys)
            except ModelSignatureError as exc:
                raise ModelSignatureError(f"refusing {label}: {exc}") from exc
            try:
                verified = verify_version(store, version.name, int(version.version), model_version=version,
                                          model_signature=signature, trusted_keys=trusted_keys)
            except ModelSignatureError as exc:
                raise EvidenceError(f"refusing {label}: {exc}") from exc
            tags, evidence = dict(verified.tags), verified.evidence
        state_path = next(iter(sorted(model_dir.rglob(STATE_FILE))), None)
        spec_path = next(iter(sorted(model_dir.rglob(SPEC_FILE))), None)
        if state_path is None or spec_path is None:
            raise ModelArtifactError(f"{uri} lacks {STATE_FILE} or {SPEC_FILE}")
        try:
            state_bytes = state_path.read_bytes()
            spec_bytes = spec_path.read_bytes()
        except OSError as exc:
            raise ModelArtifactError(f"{uri} has unreadable weights or spec: {exc}") from exc
    if signature is not None:  # the bytes parsed below are the bytes that were verified
        for path, data in ((state_path, state_bytes), (spec_path, spec_bytes)):
            rel = path.relative_to(model_dir).as_posix()
            if signature.files.get(rel) != hashlib.sha256(data).hexdigest():
                raise ModelSignatureError(f"refusing {label}: altered: {rel} changed after verification")
    try:
        spec = ModelSpec.from_json(spec_bytes.decode("utf-8"))
        state = torch.load(io.BytesIO(state_bytes), weights_only=True, map_location="cpu")
    except (ConfigError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise ModelArtifactError(f"{uri} has unreadable weights or spec: {exc}") from exc
    return LoadedModel(
        name=version.name,
        version=int(version.version),
        spec=spec,
        state_dict=state,
        tags=tags,
        aliases=tuple(getattr(version, "aliases", ()) or ()),
        signature=signature,
        evidence=evidence,
    )
