"""Signed evidence: one registered version's facts, bound to it by the consortium key.

The model signature (:mod:`registry.signing`) covers a model directory's files. The gates read
the version's lineage and ``metric.*`` tags, the dossier reads them too, serving's drift monitor
reads ``input_reference``: MLflow tags that anyone with registry write access can edit, and a
signed directory can be registered again as another version. The evidence closes both: at
publication the coordinator signs, with the same Ed25519 key, a canonical JSON payload
(:data:`EVIDENCE_FORMAT`)::

    {"format": "fedseg-evidence/v2",
     "name": "fedseg-unet", "version": 3, "run_id": "<the version's training run>",
     "model_digest": "<the model signature's digest>", "model_files": {"artifacts/state_dict.pt": "<sha256>", ...},
     "tags": {"eval_sites": "<sha256 of the tag's value>", "metric.dice_min": "...", ...},
     "dossier_path": "dossier/v3", "dossier_files": {"dossier.md": "<sha256>", ...},
     "attestation": null, "key_fingerprint": "...", "signed_at": "..."}

and stores it, with the signature, in the version tag :data:`EVIDENCE_TAG`. Promotion, serving's
loader and the dossier call :func:`verify_version`, which refuses every difference by name.

Which tags are signed is decided here, and only here: every version tag except the annotations
written after publication (:data:`UNSIGNED_TAGS`, :data:`UNSIGNED_TAG_PREFIXES`: promotion,
rollback and challenger records, comments, the evidence itself). A tag written at publication is
signed without a change here; a tag written later must be added to those annotations, or every
version that gets it stops verifying.

Versions published before the evidence existed carry a model signature in
:data:`~registry.signing.LEGACY_SIGNATURE_FORMAT` and no evidence: :func:`verify_version`
refuses them unless ``allow_legacy`` (the dossier, which then says so), and
:func:`attest_version` (``fedseg registry attest``) signs their evidence after an operator's review.
A model signed in the current format whose evidence tag is gone is refused as such, never taken
for an old one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .artifacts import dossier_artifact_dir
from .comments import COMMENT_TAG_PREFIX
from .errors import EvidenceError, ModelSignatureError
from .fetch import download_model_dir, download_run_dir
from .signing import (
    LEGACY_SIGNATURE_FORMAT,
    SIGNATURE_FORMAT,
    Signature,
    describe_changes,
    key_fingerprint,
    model_manifest,
    verify_model_dir,
    verify_signed_bytes,
)
from .store import RegistryStore

__all__ = [
    "EVIDENCE_FORMAT",
    "EVIDENCE_TAG",
    "UNSIGNED_TAGS",
    "UNSIGNED_TAG_PREFIXES",
    "Evidence",
    "VerifiedVersion",
    "attest_version",
    "check_signer",
    "is_signed_tag",
    "sign_evidence",
    "signed_tags",
    "verify_version",
]

EVIDENCE_FORMAT = "fedseg-evidence/v2"
EVIDENCE_TAG = "signature.evidence"

#: Version tags written after the evidence is signed; every other version tag is signed.
UNSIGNED_TAGS = frozenset({
    EVIDENCE_TAG,
    "promoted_at", "promoted_by", "forced_reason",  # registry.promotion
    "rolled_back_at", "rolled_back_by",
    "challenger_set_at", "challenger_set_by",  # registry.challenger
    "challenger_cleared_at", "challenger_cleared_by",
})
UNSIGNED_TAG_PREFIXES: tuple[str, ...] = (COMMENT_TAG_PREFIX,)  # registry.comments

_SIGNER_KEYS = Iterable[Any] | Mapping[str, Any] | None


def is_signed_tag(key: str) -> bool:
    """Whether the evidence covers version tag ``key``."""
    return key not in UNSIGNED_TAGS and not key.startswith(UNSIGNED_TAG_PREFIXES)


def signed_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags the evidence covers, sorted."""
    return {k: tags[k] for k in sorted(tags) if is_signed_tag(k)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# ----------------------------------------------------------------------------- the payload


@dataclass(frozen=True)
class Evidence:
    """What the consortium key signed about one version (see the module docstring)."""

    name: str
    version: int
    run_id: str
    model_digest: str
    model_files: Mapping[str, str]
    tags: Mapping[str, str]  # tag -> sha256 of its value
    dossier_path: str
    dossier_files: Mapping[str, str]
    key_fingerprint: str
    signed_at: str
    attestation: Mapping[str, str] | None = None  # {"reason", "actor"} when attested later
    signature: str = ""  # base64 Ed25519 over message()
    format: str = EVIDENCE_FORMAT

    def payload(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "model_digest": self.model_digest,
            "model_files": dict(self.model_files),
            "tags": dict(self.tags),
            "dossier_path": self.dossier_path,
            "dossier_files": dict(self.dossier_files),
            "attestation": None if self.attestation is None else dict(self.attestation),
            "key_fingerprint": self.key_fingerprint,
            "signed_at": self.signed_at,
        }

    def message(self) -> bytes:
        """The bytes that are signed: the payload as canonical JSON."""
        return _canonical(self.payload())

    def to_tag(self) -> str:
        return json.dumps({"payload": self.payload(), "signature": self.signature},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_tag(cls, text: str) -> Evidence:
        """Parse the :data:`EVIDENCE_TAG` value.

        Raises
        ------
        EvidenceError
            Not JSON, an unknown format, or a field of the wrong type.
        """
        try:
            raw = json.loads(text)
            payload, signature = raw["payload"], raw["signature"]
            if payload.get("format") != EVIDENCE_FORMAT:
                raise EvidenceError(
                    f"tag {EVIDENCE_TAG} has format {payload.get('format')!r}, expected {EVIDENCE_FORMAT}"
                )
            evidence = cls(
                name=_str(payload["name"]),
                version=int(payload["version"]),
                run_id=_str(payload["run_id"]),
                model_digest=_str(payload["model_digest"]),
                model_files=_hashes(payload["model_files"]),
                tags=_hashes(payload["tags"]),
                dossier_path=_str(payload["dossier_path"]),
                dossier_files=_hashes(payload["dossier_files"]),
                key_fingerprint=_str(payload["key_fingerprint"]),
                signed_at=_str(payload["signed_at"]),
                attestation=None if payload.get("attestation") is None
                else _hashes(payload["attestation"]),
                signature=_str(signature),
            )
        except EvidenceError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EvidenceError(f"tag {EVIDENCE_TAG} is malformed: {type(exc).__name__}: {exc}") from None
        if evidence.payload() != payload:  # an unknown or misspelt field is not silently dropped
            raise EvidenceError(f"tag {EVIDENCE_TAG} is malformed: unexpected fields")
        return evidence


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _hashes(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError("not an object")
    return {_str(k): _str(v) for k, v in value.items()}


# ----------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose model signature and evidence verified (or, with ``allow_legacy``, whose
    model signature verified and which predates evidence: ``evidence`` is None).

    ``tags`` is the snapshot that was checked: read facts from it, not from a second query.
    """

    name: str
    version: int
    run_id: str | None
    tags: Mapping[str, str]
    model_signature: Signature
    evidence: Evidence | None

    @property
    def legacy(self) -> bool:
        return self.evidence is None

    def describe(self) -> str:
        """One line for people: what vouches for this version's facts."""
        if self.evidence is None:
            return f"NOT SIGNED: {_legacy_text(self.name, self.version)}"
        e = self.evidence
        attested = ""
        if e.attestation:
            attested = (f", attested by {e.attestation.get('actor', 'unknown')}: "
                        f"{e.attestation.get('reason', '')}")
        return (f"signed evidence {e.format} by key {e.key_fingerprint[:16]} at {e.signed_at} "
                f"({len(e.tags)} tags, {len(e.model_files)} model files, "
                f"{len(e.dossier_files)} dossier files{attested})")


def _legacy_text(name: str, version: int) -> str:
    return (
        f"signed in the old format {LEGACY_SIGNATURE_FORMAT}, which covers the model files only: "
        "not the model name, the version, its run, nor the lineage and metric tags the gates, the "
        f"dossier and drift read; review it and sign its evidence with `fedseg registry attest "
        f"{name} {version} --reason ...`, or publish it again"
    )


def verify_version(
    store: RegistryStore,
    name: str,
    version: int,
    *,
    trusted_keys: _SIGNER_KEYS = None,
    model_version: Any = None,
    model_signature: Signature | None = None,
    allow_legacy: bool = False,
) -> VerifiedVersion:
    """Check ``name`` ``version`` against its signed evidence.

    Parameters
    ----------
    store : RegistryStore
    name, version
        The registered version.
    trusted_keys : optional
        Keys (or paths) to trust; default ``FEDSEG_TRUSTED_KEYS`` or ``$FEDSEG_HOME/keys/trusted/``.
    model_version : mlflow ModelVersion, optional
        The version already fetched (its tags are the snapshot checked).
    model_signature : Signature, optional
        The verified signature of the version's model directory, when the caller has just
        downloaded and verified it (serving's loader); else it is downloaded and verified here.
    allow_legacy : bool
        Accept a version signed before evidence existed (``evidence`` is then None).

    Raises
    ------
    EvidenceError
        Naming every difference: the model, version or run it was signed for, each tag that
        differs, is not signed or is missing, the model files, the dossier files; or the evidence
        is missing, malformed, by an untrusted key, does not verify, or is in the old format.
    ModelSignatureError
        The model directory's own signature does not verify.
    ModelArtifactError
        The artifacts cannot be fetched.
    """
    mv = model_version if model_version is not None else store.client().get_model_version(name, str(version))
    label = f"{mv.name} v{mv.version}"
    tags = dict(mv.tags)
    if model_signature is None:
        model_signature = _verified_model_signature(store, mv, trusted_keys)
    raw = tags.get(EVIDENCE_TAG)
    if raw is None:
        if model_signature.format == SIGNATURE_FORMAT:
            raise EvidenceError(
                f"{label} has no signed evidence (tag {EVIDENCE_TAG} removed): its model was signed "
                f"as {SIGNATURE_FORMAT}, which is always published with evidence"
            )
        if not allow_legacy:
            raise EvidenceError(f"{label} is {_legacy_text(mv.name, int(mv.version))}")
        return VerifiedVersion(mv.name, int(mv.version), mv.run_id or None, tags, model_signature, None)
    evidence = Evidence.from_tag(raw)
    try:
        verify_signed_bytes(evidence.message(), evidence.signature, evidence.key_fingerprint, trusted_keys)
    except ModelSignatureError as exc:
        raise EvidenceError(f"the signed evidence of {label}: {exc}") from None
    differences = _differences(store, evidence, mv, tags, model_signature)
    if differences:
        raise EvidenceError(f"{label} does not match its signed evidence: {'; '.join(differences)}")
    return VerifiedVersion(mv.name, int(mv.version), mv.run_id or None, tags, model_signature, evidence)


def _verified_model_signature(store: RegistryStore, mv: Any, trusted_keys: _SIGNER_KEYS) -> Signature:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, found = download_model_dir(store, mv.source, Path(tmp))
        if not found:
            raise ModelSignatureError(f"{mv.name} v{mv.version}: no MLmodel, not a model directory")
        try:
            return verify_model_dir(model_dir, trusted_keys)
        except ModelSignatureError as exc:
            raise ModelSignatureError(f"{mv.name} v{mv.version}: {exc}") from exc


def _dossier_files(store: RegistryStore, run_id: str | None, version: int) -> dict[str, str]:
    if not run_id:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        local = download_run_dir(store, run_id, dossier_artifact_dir(version), Path(tmp))
        return {} if local is None else model_manifest(local)


def _differences(
    store: RegistryStore, evidence: Evidence, mv: Any, tags: Mapping[str, str], model: Signature
) -> list[str]:
    out = []
    if evidence.name != mv.name:
        out.append(f"signed for model {evidence.name!r}, this is {mv.name!r}")
    if evidence.version != int(mv.version):
        out.append(f"signed for version {evidence.version}, this is version {mv.version}")
    if evidence.run_id != (mv.run_id or ""):
        out.append(f"signed for run {evidence.run_id or 'none'}, version's run is {mv.run_id or 'none'}")
    if evidence.model_digest != model.digest:
        changes = describe_changes(evidence.model_files, model.files) or "same paths, other digest"
        out.append(f"model files differ from the signed evidence ({changes})")
    current = {k: _sha256(v) for k, v in signed_tags(tags).items()}
    for key in sorted(current.keys() | evidence.tags.keys()):
        if key not in evidence.tags:
            out.append(f"tag {key} is not in the signed evidence")
        elif key not in current:
            out.append(f"signed tag {key} is missing")
        elif current[key] != evidence.tags[key]:
            out.append(f"tag {key} differs from the signed evidence")
    dossier = _dossier_files(store, mv.run_id, int(mv.version))
    for path in sorted(dossier.keys() | evidence.dossier_files.keys()):
        if path not in evidence.dossier_files:
            out.append(f"dossier file {path} is not in the signed evidence")
        elif path not in dossier:
            out.append(f"signed dossier file {path} is missing")
        elif dossier[path] != evidence.dossier_files[path]:
            out.append(f"dossier file {path} differs from the signed evidence")
    return out


# ----------------------------------------------------------------------------- signing


def sign_evidence(
    store: RegistryStore,
    name: str,
    version: int,
    key: Ed25519PrivateKey,
    *,
    model_signature: Signature,
    tags: Mapping[str, str] | None = None,
    attestation: Mapping[str, str] | None = None,
) -> Evidence:
    """Sign the evidence of ``name`` ``version`` and store it in its :data:`EVIDENCE_TAG`.

    Parameters
    ----------
    model_signature : Signature
        The signature of the version's model directory (from :func:`sign_model_dir` at
        publication, from :func:`verify_version` later).
    tags : mapping, optional
        The tags to sign: those the version was created with, or a verified snapshot. Default:
        the version's tags now.
    attestation : mapping, optional
        ``{"reason", "actor"}`` when an operator signs an already-published version.
    """
    client = store.client()
    mv = client.get_model_version(name, str(version))
    current = dict(mv.tags) if tags is None else dict(tags)
    evidence = Evidence(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or "",
        model_digest=model_signature.digest,
        model_files=dict(model_signature.files),
        tags={k: _sha256(v) for k, v in signed_tags(current).items()},
        dossier_path=dossier_artifact_dir(int(mv.version)),
        dossier_files=_dossier_files(store, mv.run_id, int(mv.version)),
        key_fingerprint=key_fingerprint(key),
        signed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        attestation=None if attestation is None else dict(attestation),
    )
    signed = replace(evidence, signature=base64.b64encode(key.sign(evidence.message())).decode("ascii"))
    client.set_model_version_tag(mv.name, str(mv.version), EVIDENCE_TAG, signed.to_tag())
    return signed


def check_signer(verified: VerifiedVersion, key: Ed25519PrivateKey) -> None:
    """Refuse to re-sign ``verified`` with a key other than the one that signed it.

    A fresh embedded key on another machine would otherwise sign evidence no service trusts.
    """
    signer = (verified.evidence.key_fingerprint if verified.evidence is not None
              else verified.model_signature.key_fingerprint)
    mine = key_fingerprint(key)
    if mine != signer:
        raise EvidenceError(
            f"{verified.name} v{verified.version} was signed by key {signer[:16]}; the signing key "
            f"here is {mine[:16]} (FEDSEG_SIGNING_KEY): sign with the consortium's key"
        )


def attest_version(
    store: RegistryStore, name: str, version: int, key: Ed25519PrivateKey, *, reason: str, actor: str
) -> Evidence:
    """Sign the evidence of a version published before evidence existed, after a review.

    The model signature must verify, be in the old format, and be by ``key``; the tags signed are
    the version's tags now, which the operator vouches for with ``reason``.

    Raises
    ------
    EvidenceError
        No reason, the version already has evidence (or its model promises it), another key.
    """
    if not reason.strip():
        raise EvidenceError(f"refusing to attest {name} v{version} without a reason: give --reason")
    verified = verify_version(store, name, version, allow_legacy=True)
    if not verified.legacy:
        raise EvidenceError(f"{name} v{version} already carries signed evidence: nothing to attest")
    check_signer(verified, key)
    return sign_evidence(
        store, name, version, key, model_signature=verified.model_signature, tags=verified.tags,
        attestation={"reason": reason.strip(), "actor": actor},
    )
