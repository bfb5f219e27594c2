"""Signed models: the consortium signs every logged model directory, services verify it.

A model directory (what ``mlflow.pyfunc.save_model`` writes: ``MLmodel``, the pyfunc code,
``artifacts/state_dict.pt``, ``artifacts/spec.json``, environment files) is reduced to a
canonical manifest (sorted relative POSIX paths, each with the SHA-256 of its bytes, excluding
the top-level ``signature.json``); its SHA-256 is the model digest. The consortium's Ed25519 key
signs the digest, and ``signature.json`` in the same directory records it.

That signature covers the files only. What binds them to one registered version, with the
version's lineage and metric tags and its dossier, is the signed evidence of
:mod:`registry.evidence`; a model signed in :data:`SIGNATURE_FORMAT` promises that evidence, one
in :data:`LEGACY_SIGNATURE_FORMAT` (published before it existed) does not.

Keys
----
Signing (the coordinator):
    ``FEDSEG_SIGNING_KEY``: path to a PEM PKCS8 Ed25519 private key, encrypted with
    ``FEDSEG_SIGNING_KEY_PASSPHRASE`` when that is set. Embedded default (unset):
    ``$FEDSEG_HOME/keys/consortium-signing-key.pem`` (0600, directory 0700), created on first
    use, its public key written to ``$FEDSEG_HOME/keys/trusted/consortium.pub.pem``.
Verification (services):
    ``FEDSEG_TRUSTED_KEYS``: a directory of ``*.pem`` public keys, or a comma-separated list of
    files (or directories). Default ``$FEDSEG_HOME/keys/trusted/``.

A key's fingerprint is the SHA-256 of its raw 32 public-key bytes, in hex; messages show the
first 16 characters.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imaging.home import fedseg_home

from .errors import ModelSignatureError, SigningKeyError

__all__ = [
    "ALGORITHM",
    "LEGACY_SIGNATURE_FORMAT",
    "SIGNATURE_FILE",
    "SIGNATURE_FORMAT",
    "SIGNING_KEY_ENV",
    "SIGNING_KEY_PASSPHRASE_ENV",
    "TRUSTED_KEYS_ENV",
    "Signature",
    "TrustedKeys",
    "as_trusted_keys",
    "describe_changes",
    "embedded_key_paths",
    "generate_keypair",
    "key_fingerprint",
    "load_signing_key",
    "load_trusted_keys",
    "model_digest",
    "model_manifest",
    "sign_model_dir",
    "verify_model_dir",
    "verify_signed_bytes",
]

ALGORITHM = "ed25519"
SIGNATURE_FILE = "signature.json"
MANIFEST_FORMAT = "fedseg-model-manifest/1"
#: Model signatures written before signed evidence existed: they cover the model files only.
LEGACY_SIGNATURE_FORMAT = "fedseg-model-signature/1"
#: Model signatures written now: the same files, and a promise that the version carries signed
#: evidence (:mod:`registry.evidence`), so a removed evidence tag is not mistaken for an old model.
SIGNATURE_FORMAT = "fedseg-model-signature/2"
SIGNATURE_FORMATS = (LEGACY_SIGNATURE_FORMAT, SIGNATURE_FORMAT)
SIGNING_KEY_ENV = "FEDSEG_SIGNING_KEY"
SIGNING_KEY_PASSPHRASE_ENV = "FEDSEG_SIGNING_KEY_PASSPHRASE"
TRUSTED_KEYS_ENV = "FEDSEG_TRUSTED_KEYS"
EMBEDDED_KEY_NAME = "consortium"

#: Trusted public keys by full hex fingerprint.
TrustedKeys = Mapping[str, Ed25519PublicKey]


# ----------------------------------------------------------------------------- keys


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """SHA-256 of the raw public-key bytes, full hex (show ``[:16]``)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _short(fingerprint: str) -> str:
    return fingerprint[:16]


def _passphrase() -> bytes | None:
    raw = os.environ.get(SIGNING_KEY_PASSPHRASE_ENV)
    return raw.encode() if raw else None


def _private_pem(key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode``; FileExistsError if it is already there.

    The bytes go to a temporary file in the same directory first and are then hard-linked into
    place, so a concurrent reader never sees a half-written key and nothing is overwritten.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _read_private_key(path: Path, passphrase: bytes | None) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a clear key
        hint = (
            f"it is encrypted: set {SIGNING_KEY_PASSPHRASE_ENV}"
            if passphrase is None
            else f"it is not encrypted: unset {SIGNING_KEY_PASSPHRASE_ENV}"
        )
        raise SigningKeyError(f"cannot load the signing key {path}: {hint}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"cannot load the signing key {path}: not a PEM PKCS8 private key, or wrong "
            f"{SIGNING_KEY_PASSPHRASE_ENV}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"the signing key {path} is a {type(key).__name__}, not an Ed25519 private key"
        )
    return key


def embedded_key_paths(home: Path | None = None) -> tuple[Path, Path]:
    """``($FEDSEG_HOME/keys/consortium-signing-key.pem, $FEDSEG_HOME/keys/trusted/consortium.pub.pem)``."""
    keys = (home or fedseg_home()) / "keys"
    return keys / f"{EMBEDDED_KEY_NAME}-signing-key.pem", keys / "trusted" / f"{EMBEDDED_KEY_NAME}.pub.pem"


def load_signing_key() -> Ed25519PrivateKey:
    """The consortium's private key: ``FEDSEG_SIGNING_KEY``, else the embedded one (created once).

    Raises
    ------
    SigningKeyError
        The key file is missing, unreadable, not Ed25519, or its passphrase is missing or wrong.
    """
    passphrase = _passphrase()
    configured = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise SigningKeyError(f"{SIGNING_KEY_ENV}={configured} is not a file")
        return _read_private_key(path, passphrase)

    private_path, public_path = embedded_key_paths()
    try:
        for directory in (private_path.parent, public_path.parent):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(private_path.parent, 0o700)
        if not private_path.exists():
            try:
                _write_new(private_path, _private_pem(Ed25519PrivateKey.generate(), passphrase), 0o600)
            except FileExistsError:
                pass  # another process created it first: use theirs
        key = _read_private_key(private_path, passphrase)
        if not public_path.exists():
            try:
                _write_new(public_path, _public_pem(key.public_key()), 0o644)
            except FileExistsError:
                pass
    except OSError as exc:
        raise SigningKeyError(
            f"cannot create the embedded signing key under {private_path.parent}: {exc.strerror or exc}"
        ) from exc
    return key


def generate_keypair(
    out_dir: Path, *, name: str = EMBEDDED_KEY_NAME, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair for a production consortium.

    Returns ``(out_dir/NAME-signing-key.pem, out_dir/NAME.pub.pem)``; the private key is PKCS8
    PEM with mode 0600 (encrypted when ``passphrase`` is given). A new ``out_dir`` is made 0700.

    Raises
    ------
    SigningKeyError
        Either file already exists (nothing is overwritten), or ``out_dir`` cannot be written.
    """
    out_dir = Path(out_dir).expanduser()
    private_path = out_dir / f"{name}-signing-key.pem"
    public_path = out_dir / f"{name}.pub.pem"
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        raise SigningKeyError(f"refusing to overwrite existing key file(s): {', '.join(existing)}")
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        _write_new(private_path, _private_pem(key, passphrase), 0o600)
        try:
            _write_new(public_path, _public_pem(key.public_key()), 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)
            raise
    except FileExistsError as exc:
        raise SigningKeyError(f"refusing to overwrite existing key file: {exc.filename or out_dir}") from exc
    except OSError as exc:
        raise SigningKeyError(f"cannot write keys to {out_dir}: {exc.strerror or exc}") from exc
    return private_path, public_path


def _read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ModelSignatureError(f"cannot read trusted key {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ModelSignatureError(f"trusted key {path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ModelSignatureError(f"trusted key {path} is a {type(key).__name__}, not Ed25519")
    return key


def load_trusted_keys(spec: str | None = None) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by fingerprint.

    Parameters
    ----------
    spec : str, optional
        A directory of ``*.pem`` files or a comma-separated list of files (or directories).
        Default: ``FEDSEG_TRUSTED_KEYS``, else ``$FEDSEG_HOME/keys/trusted/`` (which may be
        absent: no keys).

    Raises
    ------
    ModelSignatureError
        A configured path does not exist or holds something that is not an Ed25519 public key.
    """
    if spec is None:
        spec = os.environ.get(TRUSTED_KEYS_ENV, "").strip()
        if not spec:
            default = embedded_key_paths()[1].parent
            return _keys_in_dir(default) if default.is_dir() else {}
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            keys.update(_keys_in_dir(path))
        elif path.is_file():
            key = _read_public_key(path)
            keys[key_fingerprint(key)] = key
        else:
            raise ModelSignatureError(f"{TRUSTED_KEYS_ENV}: {entry} does not exist")
    return keys


def _keys_in_dir(directory: Path) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for path in sorted(directory.glob("*.pem")):
        key = _read_public_key(path)
        keys[key_fingerprint(key)] = key
    return keys


def as_trusted_keys(
    trusted_keys: TrustedKeys | Iterable[Ed25519PublicKey | Path | str] | None,
) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by fingerprint from keys, paths, a mapping, or (None) the configured ones."""
    if trusted_keys is None:
        return load_trusted_keys()
    if isinstance(trusted_keys, Mapping):
        return {key_fingerprint(k): k for k in trusted_keys.values()}
    keys: dict[str, Ed25519PublicKey] = {}
    for item in trusted_keys:
        if isinstance(item, Ed25519PublicKey):
            keys[key_fingerprint(item)] = item
        elif isinstance(item, (str, Path)):
            keys.update(load_trusted_keys(str(item)))
        else:
            raise TypeError(f"a trusted key is an Ed25519PublicKey or a path, not {type(item).__name__}")
    return keys


# ----------------------------------------------------------------------------- digest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_manifest(model_dir: Path) -> dict[str, str]:
    """``{relative POSIX path: sha256 hex}`` of every file under ``model_dir``, sorted.

    The top-level ``signature.json`` is left out; so is nothing else.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelSignatureError(f"{model_dir} is not a model directory")
    files = {}
    for path in model_dir.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(model_dir).as_posix()
        if rel == SIGNATURE_FILE:
            continue
        files[rel] = _file_sha256(path)
    return dict(sorted(files.items()))


def _manifest_digest(manifest: Mapping[str, str]) -> str:
    canonical = json.dumps(
        {"format": MANIFEST_FORMAT, "files": sorted([p, h] for p, h in manifest.items())},
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def model_digest(model_dir: Path) -> str:
    """SHA-256 (hex) of the canonical manifest of ``model_dir`` (see :func:`model_manifest`)."""
    return _manifest_digest(model_manifest(model_dir))


# ----------------------------------------------------------------------------- sign / verify


@dataclass(frozen=True)
class Signature:
    """What ``signature.json`` records.

    ``files`` is the signed manifest, kept to name what changed when a digest does not match;
    the verdict rests on ``digest`` and ``signature`` alone. ``format`` is signed too:
    :data:`SIGNATURE_FORMAT` (evidence required) or :data:`LEGACY_SIGNATURE_FORMAT`.
    """

    algorithm: str
    digest: str
    signature: str  # base64 of the 64-byte Ed25519 signature
    key_fingerprint: str  # full hex
    signed_at: str  # ISO 8601, UTC
    files: dict[str, str] = field(default_factory=dict)
    format: str = SIGNATURE_FORMAT

    @property
    def legacy(self) -> bool:
        """Signed before evidence existed: covers the files, not the version's tags."""
        return self.format == LEGACY_SIGNATURE_FORMAT

    @property
    def short_fingerprint(self) -> str:
        return _short(self.key_fingerprint)

    def message(self) -> bytes:
        """The bytes that are signed: the digest, algorithm, signer and time, canonically."""
        return json.dumps(
            {
                "format": self.format,
                "algorithm": self.algorithm,
                "digest": self.digest,
                "key_fingerprint": self.key_fingerprint,
                "signed_at": self.signed_at,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": self.format,
                "algorithm": self.algorithm,
                "digest": self.digest,
                "signature": self.signature,
                "key_fingerprint": self.key_fingerprint,
                "signed_at": self.signed_at,
                "files": self.files,
            },
            indent=2,
        ) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Signature:
        try:
            raw = json.loads(text)
            files = raw.get("files", {})
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
            fields = {k: raw[k] for k in ("algorithm", "digest", "signature", "key_fingerprint", "signed_at")}
            if not all(isinstance(v, str) for v in fields.values()):
                raise TypeError("a field is not a string")
            fmt = raw.get("format", LEGACY_SIGNATURE_FORMAT)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelSignatureError(f"malformed {SIGNATURE_FILE}: {exc}") from exc
        if fmt not in SIGNATURE_FORMATS:
            raise ModelSignatureError(
                f"unsupported signature format {fmt!r} (expected one of {', '.join(SIGNATURE_FORMATS)})"
            )
        return cls(**fields, files={str(k): str(v) for k, v in files.items()}, format=fmt)

    def tags(self) -> dict[str, str]:
        """Registry version tags naming the signer and the digest."""
        return {"signature.key_fingerprint": self.key_fingerprint, "signature.digest": self.digest}


def sign_model_dir(
    model_dir: Path, key: Ed25519PrivateKey, *, format: str = SIGNATURE_FORMAT
) -> Signature:
    """Sign ``model_dir``'s digest with ``key`` and write ``signature.json`` into it.

    ``format`` :data:`LEGACY_SIGNATURE_FORMAT` writes what fedseg wrote before signed evidence
    (for tests of already-published versions).
    """
    if format not in SIGNATURE_FORMATS:
        raise ValueError(f"unknown signature format {format!r}")
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir)
    unsigned = Signature(
        algorithm=ALGORITHM,
        digest=_manifest_digest(manifest),
        signature="",
        key_fingerprint=key_fingerprint(key),
        signed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=manifest,
        format=format,
    )
    raw = key.sign(unsigned.message())
    signature = replace(unsigned, signature=base64.b64encode(raw).decode("ascii"))
    (model_dir / SIGNATURE_FILE).write_text(signature.to_json())
    return signature


def describe_changes(signed: Mapping[str, str], actual: Mapping[str, str]) -> str:
    """``"changed a, b; added c; removed d"`` between two ``{path: sha256}`` manifests ("" if equal)."""
    changed = sorted(p for p in signed.keys() & actual.keys() if signed[p] != actual[p])
    added = sorted(actual.keys() - signed.keys())
    removed = sorted(signed.keys() - actual.keys())
    return "; ".join(
        f"{label} {', '.join(paths)}"
        for label, paths in (("changed", changed), ("added", added), ("removed", removed))
        if paths
    )


def _changes(signed: Mapping[str, str], actual: Mapping[str, str]) -> str:
    described = describe_changes(signed, actual)
    return f"; {described}" if described else ""


def verify_signed_bytes(
    message: bytes,
    signature_b64: str,
    fingerprint: str,
    trusted_keys: TrustedKeys | Iterable[Ed25519PublicKey | Path | str] | None = None,
) -> None:
    """Check that a trusted key with ``fingerprint`` signed ``message``.

    Raises
    ------
    ModelSignatureError
        ``no trusted keys configured``, ``signed by untrusted key ...`` or
        ``signature does not verify``.
    """
    keys = as_trusted_keys(trusted_keys)
    if not keys:
        raise ModelSignatureError(f"no trusted keys configured ({TRUSTED_KEYS_ENV})")
    key = keys.get(fingerprint)
    if key is None:
        trusted = ", ".join(sorted(_short(fp) for fp in keys))
        raise ModelSignatureError(f"signed by untrusted key {_short(fingerprint)} (trusted: {trusted})")
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError) as exc:
        raise ModelSignatureError(f"signature does not verify (key {_short(fingerprint)})") from exc


def verify_model_dir(
    model_dir: Path,
    trusted_keys: TrustedKeys | Iterable[Ed25519PublicKey | Path | str] | None = None,
) -> Signature:
    """Check that ``model_dir`` is, byte for byte, what a trusted key signed.

    Parameters
    ----------
    model_dir : Path
        The directory holding ``MLmodel`` and ``signature.json``.
    trusted_keys : mapping or iterable, optional
        Public keys (or paths to them) to trust. Default: :func:`load_trusted_keys`
        (``FEDSEG_TRUSTED_KEYS`` or ``$FEDSEG_HOME/keys/trusted/``).

    Returns
    -------
    Signature
        The verified signature; its ``files`` are the manifest of the bytes just checked.

    Raises
    ------
    ModelSignatureError
        Saying why: unsigned, altered (digest mismatch), signature does not verify, signed by an
        untrusted key, or no trusted keys configured.
    """
    model_dir = Path(model_dir)
    sig_path = model_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        raise ModelSignatureError(f"unsigned (no {SIGNATURE_FILE})")
    claimed = Signature.from_json(sig_path.read_text())
    if claimed.algorithm != ALGORITHM:
        raise ModelSignatureError(f"unsupported signature algorithm {claimed.algorithm!r} (expected {ALGORITHM})")
    manifest = model_manifest(model_dir)
    digest = _manifest_digest(manifest)
    if digest != claimed.digest:
        raise ModelSignatureError(
            f"altered: digest mismatch (expected {claimed.digest}, got {digest})"
            f"{_changes(claimed.files, manifest)}"
        )
    verify_signed_bytes(claimed.message(), claimed.signature, claimed.key_fingerprint, trusted_keys)
    return replace(claimed, files=manifest)
