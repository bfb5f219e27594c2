"""Site enrolment: a site's name, its SuperNode key and its declared data, bound by signatures.

At enrolment a hospital signs the manifest ``fedseg site check`` wrote with its node's private
key (the EC key ``flower-supernode --auth-supernode-private-key`` loads): the enrolment document
names the site, carries its public key and the manifest, and a signature over all three. The
operator admits it with :func:`enrol` only if its public key is the one registered with the
SuperLink for that site (the ``.pub`` file of ``fedseg pki site-key``), and keeps one file per
site in the enrolment directory: the mapping site name <-> node key <-> declared data that the
coordinator loads (:class:`EnrolledSites`) and checks every reply against.

Every reply of an enrolled site carries a signature, by the same key, over its
:class:`imaging.replies.ReplyStatement` (site name, run, round, node, instruction, sample count,
weights digest): :func:`sign_statement` and :meth:`EnrolledSites.verify`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imaging.errors import ReplyError
from imaging.home import fedseg_home
from imaging.replies import ReplyStatement, check_site_name

from .errors import EnrolmentError
from .pki import read_site_public_key, ssh_fingerprint

__all__ = [
    "ENROLMENT_DIR_ENV",
    "ENROLMENT_FORMAT",
    "EnrolledSites",
    "Enrolment",
    "default_enrolment_dir",
    "enrol",
    "load_node_key",
    "load_node_public_key",
    "read_enrolment",
    "sign_manifest",
    "sign_statement",
    "write_enrolment",
]

ENROLMENT_FORMAT = "fedseg-enrolment/1"
ENROLMENT_DIR_ENV = "FEDSEG_ENROLMENT_DIR"
_ECDSA = ec.ECDSA(hashes.SHA256())


def default_enrolment_dir() -> Path:
    """``$FEDSEG_ENROLMENT_DIR``, else ``$FEDSEG_HOME/enrolment``: where the coordinator looks."""
    raw = os.environ.get(ENROLMENT_DIR_ENV, "").strip()
    return Path(raw).expanduser() if raw else fedseg_home() / "enrolment"


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node's EC private key (OpenSSH, as ``fedseg pki site-key`` writes it, or PEM)."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EnrolmentError(f"node key {path} cannot be read ({exc.strerror})") from exc
    try:
        key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH" in data
               else serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EnrolmentError(f"node key {path} is not an unencrypted OpenSSH or PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnrolmentError(f"node key {path} is not an EC key (SuperNode keys are EC on a NIST curve)")
    return key


def load_node_public_key(pem: bytes) -> ec.EllipticCurvePublicKey | None:
    """The EC key the SuperLink authenticated a node with (PEM, as ``Grid.get_nodes`` reports it
    under ``--enable-supernode-auth``); None for anything else (the simulation's random bytes)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def _openssh_line(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _signed_bytes(site: str, public_key: str, manifest: Mapping[str, Any]) -> bytes:
    body = {"format": ENROLMENT_FORMAT, "site": site, "public_key": public_key, "manifest": manifest}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _declared_samples(manifest: Mapping[str, Any]) -> int:
    counts = manifest.get("counts")
    value = counts.get("slices_usable") if isinstance(counts, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EnrolmentError("the manifest lacks counts.slices_usable (write it with `fedseg site check`)")
    return value


@dataclass(frozen=True)
class Enrolment:
    """One enrolled site: its name, node key and signed manifest."""

    site: str
    public_key: ec.EllipticCurvePublicKey
    manifest: Mapping[str, Any]
    signature: bytes

    @property
    def max_samples(self) -> int:
        """The usable slices the site declared: no reply may claim more samples."""
        return _declared_samples(self.manifest)

    @property
    def fingerprint(self) -> str:
        return ssh_fingerprint(self.public_key)

    def to_json(self) -> dict[str, Any]:
        return {"format": ENROLMENT_FORMAT, "site": self.site, "public_key": _openssh_line(self.public_key),
                "manifest": dict(self.manifest), "signature": base64.b64encode(self.signature).decode()}


def sign_manifest(manifest: Mapping[str, Any], node_key: Path, site: str | None = None) -> Enrolment:
    """The site's enrolment: its manifest signed with its node key (run at the hospital)."""
    name = site or str(manifest.get("site", ""))
    try:
        check_site_name(name)
    except ReplyError as exc:
        raise EnrolmentError(str(exc)) from None
    _declared_samples(manifest)
    key = load_node_key(node_key)
    signature = key.sign(_signed_bytes(name, _openssh_line(key.public_key()), manifest), _ECDSA)
    return Enrolment(name, key.public_key(), dict(manifest), signature)


def _parse(doc: object, where: str) -> Enrolment:
    if not isinstance(doc, dict) or doc.get("format") != ENROLMENT_FORMAT:
        raise EnrolmentError(f"{where} is not a {ENROLMENT_FORMAT} document")
    site, line, manifest, signature = (doc.get(k) for k in ("site", "public_key", "manifest", "signature"))
    try:
        check_site_name(site)
    except ReplyError as exc:
        raise EnrolmentError(f"{where}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(line, str) or not isinstance(signature, str):
        raise EnrolmentError(f"{where} lacks its public_key, manifest or signature")
    try:
        key = serialization.load_ssh_public_key(line.encode())
        raw_signature = base64.b64decode(signature, validate=True)
    except (ValueError, UnsupportedAlgorithm, binascii.Error) as exc:
        raise EnrolmentError(f"{where}: unreadable public key or signature ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EnrolmentError(f"{where}: the public key is not an EC key")
    try:
        key.verify(raw_signature, _signed_bytes(site, line, manifest), _ECDSA)
    except InvalidSignature:
        raise EnrolmentError(
            f"{where}: the signature does not verify with the enrolled key {ssh_fingerprint(key)}: "
            "the manifest, site name or key was edited after signing, or signed with another key"
        ) from None
    _declared_samples(manifest)
    return Enrolment(site, key, manifest, raw_signature)


def read_enrolment(path: Path) -> Enrolment:
    """An enrolment document, its signature verified; :class:`EnrolmentError` naming the file if not."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnrolmentError(f"enrolment {path} cannot be read as JSON ({exc})") from None
    return _parse(doc, f"enrolment {path}")


def write_enrolment(enrolment: Enrolment, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(enrolment.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def enrol(document: Path, registered_key: Path, enrolment_dir: Path, *, force: bool = False) -> Enrolment:
    """The operator's step: admit a site's signed enrolment into ``enrolment_dir/<site>.json``.

    Refused unless the document's signature verifies, its key is the one registered with the
    SuperLink (``registered_key``, the site's ``.pub``), and neither its name nor its key is
    enrolled already for another site (``force`` replaces the site's own earlier enrolment).
    """
    enrolment = read_enrolment(document)
    registered, _ = read_site_public_key(registered_key)
    if _openssh_line(registered) != _openssh_line(enrolment.public_key):
        raise EnrolmentError(
            f"enrolment {document} is signed with key {enrolment.fingerprint}, not with the key "
            f"registered for the node ({ssh_fingerprint(registered)}, {registered_key}): refused"
        )
    existing = EnrolledSites.load(enrolment_dir)
    other = existing.site_of_key(enrolment.public_key)
    if other is not None and other != enrolment.site:
        raise EnrolmentError(f"key {enrolment.fingerprint} is already enrolled as site {other!r}")
    if enrolment.site in existing and not force:
        raise EnrolmentError(f"site {enrolment.site!r} is already enrolled in {enrolment_dir} (--force replaces it)")
    write_enrolment(enrolment, Path(enrolment_dir) / f"{enrolment.site}.json")
    return enrolment


@dataclass(frozen=True)
class EnrolledSites(Mapping[str, Enrolment]):
    """The enrolment directory, every file's signature verified: site name -> enrolment."""

    sites: Mapping[str, Enrolment]
    source: str = ""

    @classmethod
    def load(cls, enrolment_dir: Path) -> EnrolledSites:
        """Every ``*.json`` of the directory (none if it does not exist); one bad file refuses all."""
        enrolment_dir = Path(enrolment_dir)
        sites: dict[str, Enrolment] = {}
        for path in sorted(enrolment_dir.glob("*.json")) if enrolment_dir.is_dir() else []:
            enrolment = read_enrolment(path)
            if path.stem != enrolment.site:
                raise EnrolmentError(f"enrolment {path} names site {enrolment.site!r}, not {path.stem!r}")
            sites[enrolment.site] = enrolment
        return cls(sites, str(enrolment_dir))

    def __getitem__(self, site: str) -> Enrolment:
        return self.sites[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def site_of_key(self, key: ec.EllipticCurvePublicKey) -> str | None:
        """The site enrolled with ``key``, if any."""
        line = _openssh_line(key)
        return next((s for s, e in self.sites.items() if _openssh_line(e.public_key) == line), None)

    def verify(self, statement: ReplyStatement, signature: str) -> bool:
        """Whether ``signature`` is the enrolled key of ``statement.site`` over ``statement``."""
        enrolment = self.sites.get(statement.site)
        if enrolment is None:
            return False
        try:
            enrolment.public_key.verify(base64.b64decode(signature, validate=True), statement.to_bytes(), _ECDSA)
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


def sign_statement(key: ec.EllipticCurvePrivateKey, statement: ReplyStatement) -> str:
    """The site's signature (base64 DER ECDSA-SHA256) over its reply statement."""
    return base64.b64encode(key.sign(statement.to_bytes(), _ECDSA)).decode()
