"""Which Flower app is running at this site: its hashes and its publisher's signature.

Flower 1.41 tells a ClientApp nothing about its FAB (``Context`` holds the run id, node id,
node and run config; the FAB hash stays inside the SuperNode). The SuperNode installs the FAB
into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<fab-hash[:8]>/`` and loads the ClientApp
from there, so the running code's folder *is* the app. From it this module derives:

``fab_sha256``
    Flower's FAB hash (what ``flwr build`` names the file by and ``flwr list`` shows), by
    rebuilding the FAB from the folder with Flower's own builder (deterministic: fixed
    timestamps, sorted files). It matches when the coordinator's zlib compresses the same way.
``content_sha256``
    SHA-256 of the FAB's ``.info/CONTENT`` manifest (each file's path and SHA-256), without the
    signature file's line: independent of compression, and what publishers sign.

A publisher signs ``content_sha256`` with an Ed25519 key (``fedseg site app-sign``); the
signature travels inside the app as ``app-signature.json``.

Inside the app (the ClientApp's own check) these keep an honest coordinator from running an
unreviewed version at the site, not a malicious app from skipping them. The check that binds is
the site's runner (:mod:`client.app_gate`, :mod:`client.site_runner`): site-installed code that
hashes the FAB the SuperNode received, with :func:`fab_bytes_identity`, before any of it runs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import PolicyError

__all__ = [
    "SIGNATURE_FILE",
    "AppIdentity",
    "fab_bytes_identity",
    "fab_file_identity",
    "identify_app",
    "load_public_key",
    "public_key_fingerprint",
    "running_app_dir",
    "sign_app",
    "verify_app_signature",
]

SIGNATURE_FILE = "app-signature.json"
SIGNATURE_FORMAT = "fedseg-app-signature/1"
_INSTALLED = re.compile(r"^.+\.([0-9a-f]{8})$")
_RAW_KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")  # base64 of 32 bytes


@dataclass(frozen=True)
class AppIdentity:
    """What the site knows about the app it runs; ``error`` says why a hash is missing."""

    fab_id: str = ""
    fab_version: str = ""
    fab_sha256: str = ""
    content_sha256: str = ""
    installed_prefix: str = ""  # the FAB hash prefix in Flower's install folder name, if any
    signature: dict[str, str] | None = None  # app-signature.json, unverified
    error: str = ""

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AppIdentity:
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


def running_app_dir() -> Path:
    """The folder holding the running ``client`` package: the installed FAB, or the project."""
    return Path(__file__).resolve().parent.parent


def _content_digest(manifest: str) -> str:
    lines = sorted(line for line in manifest.splitlines()
                   if line.strip() and line.split(",", 1)[0] != SIGNATURE_FILE)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _from_fab_bytes(fab: bytes, **extra: Any) -> AppIdentity:
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        manifest = archive.read(".info/CONTENT").decode()
        names = set(archive.namelist())
        signature = (json.loads(archive.read(SIGNATURE_FILE)) if SIGNATURE_FILE in names else None)
        if not isinstance(signature, dict):
            signature = None
        meta = _fab_meta(archive.read("pyproject.toml").decode())
    return AppIdentity(fab_sha256=hashlib.sha256(fab).hexdigest(),
                       content_sha256=_content_digest(manifest), signature=signature, **meta, **extra)


def _fab_meta(pyproject: str) -> dict[str, str]:
    import tomllib

    try:
        config = tomllib.loads(pyproject)
        return {"fab_id": f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}",
                "fab_version": str(config["project"]["version"])}
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        return {}


def identify_app(app_dir: Path | None = None, *, hashes: bool = True) -> AppIdentity:
    """Hashes (and the unverified signature) of the Flower app in ``app_dir``.

    ``app_dir`` defaults to :func:`running_app_dir`. ``hashes=False`` skips rebuilding the FAB
    (about a second for this project): only the id, version and Flower's install-folder prefix.
    Never raises: a folder that is not a Flower app (an installed wheel) gives an identity whose
    ``error`` says so.
    """
    app_dir = Path(app_dir) if app_dir is not None else running_app_dir()
    match = _INSTALLED.match(app_dir.name)
    prefix = match.group(1) if match and app_dir.parent.name == "apps" else ""
    if not (app_dir / "pyproject.toml").is_file():
        return AppIdentity(installed_prefix=prefix,
                           error=f"the running code in {app_dir} is not a Flower app folder (no pyproject.toml)")
    if not hashes:
        try:
            meta = _fab_meta((app_dir / "pyproject.toml").read_text())
        except OSError:
            meta = {}
        return AppIdentity(installed_prefix=prefix, **meta)
    try:
        from flwr.cli.build import build_fab_from_disk

        fab = build_fab_from_disk(app_dir)
        identity = _from_fab_bytes(fab, installed_prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - any build failure means: identity unknown
        return AppIdentity(installed_prefix=prefix, error=f"cannot rebuild the FAB of {app_dir}: {exc}")
    if prefix and not identity.fab_sha256.startswith(prefix):
        return AppIdentity(identity.fab_id, identity.fab_version, identity.fab_sha256,
                           identity.content_sha256, prefix, identity.signature,
                           error=f"the app folder {app_dir} differs from the FAB Flower installed "
                                 f"(hash {identity.fab_sha256[:8]}..., installed {prefix}...)")
    return identity


def fab_bytes_identity(fab: bytes) -> AppIdentity:
    """Hashes and signature of FAB bytes (what the SuperNode received); never raises.

    Only reads the archive: nothing in it is imported or installed. An unreadable FAB gives an
    identity with its FAB hash and an ``error``.
    """
    try:
        return _from_fab_bytes(fab)
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, ValueError) as exc:
        return AppIdentity(fab_sha256=hashlib.sha256(fab).hexdigest(),
                           error=f"the FAB is not a readable Flower app package ({type(exc).__name__})")


def fab_file_identity(fab_file: Path) -> AppIdentity:
    """Hashes and signature of a ``.fab`` file (what ``flwr build`` writes)."""
    try:
        return _from_fab_bytes(Path(fab_file).read_bytes())
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise PolicyError(f"{fab_file} is not a readable Flower FAB: {exc}") from exc


# ------------------------------------------------------------------------- keys, signatures


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32 public-key bytes, hex (the form ``fedseg registry`` uses too)."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)).hexdigest()


def load_public_key(spec: str, base_dir: Path | None = None) -> Ed25519PublicKey:
    """An Ed25519 public key from a policy entry.

    ``spec`` is a PEM or OpenSSH public-key file (relative paths from ``base_dir``), an
    ``ssh-ed25519 AAAA...`` line, or the base64 of the 32 raw key bytes.
    """
    spec = spec.strip()
    try:
        if spec.startswith("ssh-ed25519 "):
            key = serialization.load_ssh_public_key(spec.encode())
        elif _RAW_KEY.match(spec):
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(spec))
        elif "/" in spec or spec.endswith((".pem", ".pub")):
            path = Path(spec).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            data = path.read_bytes()
            key = (serialization.load_ssh_public_key(data) if data.startswith(b"ssh-")
                   else serialization.load_pem_public_key(data))
        else:
            raw = base64.b64decode(spec, validate=True)
            if len(raw) != 32:
                raise ValueError(f"{len(raw)} bytes, an Ed25519 public key has 32")
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"trusted publisher key {spec[:60]!r}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PolicyError(f"trusted publisher key {spec[:60]!r} is not an Ed25519 key")
    return key


def _signed_message(content_sha256: str) -> bytes:
    return f"{SIGNATURE_FORMAT}\n{content_sha256}".encode()


def sign_app(app_dir: Path, private_key: Ed25519PrivateKey) -> Path:
    """Sign the app in ``app_dir``: writes ``app_dir/app-signature.json`` (before ``flwr build``)."""
    identity = identify_app(app_dir)
    if identity.error:
        raise PolicyError(identity.error)
    public = private_key.public_key()
    signature = {
        "format": SIGNATURE_FORMAT,
        "content_sha256": identity.content_sha256,
        "public_key": base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)).decode(),
        "fingerprint": public_key_fingerprint(public),
        "signature": base64.b64encode(private_key.sign(_signed_message(identity.content_sha256))).decode(),
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(app_dir) / SIGNATURE_FILE
    path.write_text(json.dumps(signature, indent=2, sort_keys=True) + "\n")
    return path


def verify_app_signature(identity: AppIdentity, trusted: dict[str, Ed25519PublicKey]) -> str | None:
    """The fingerprint of the trusted key whose signature covers this app's content, or None."""
    sig = identity.signature
    if not sig or not identity.content_sha256 or sig.get("content_sha256") != identity.content_sha256:
        return None
    key = trusted.get(str(sig.get("fingerprint", "")))
    if key is None:
        return None
    try:
        key.verify(base64.b64decode(str(sig.get("signature", ""))), _signed_message(identity.content_sha256))
    except (InvalidSignature, ValueError):
        return None
    return public_key_fingerprint(key)
