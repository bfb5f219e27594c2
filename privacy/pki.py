"""Keys and certificates of a real federation (``cryptography``), in the formats Flower reads.

- The consortium CA: an EC P-384 key and a self-signed certificate (``ca.key``, ``ca.crt``). Its
  certificate is what every SuperNode and the operator's ``flwr`` pass as root certificate.
- The SuperLink's TLS server certificate (``superlink.crt``, ``superlink.key``), signed by the CA,
  with the host names and IP addresses the hospitals dial as subject alternative names.
- Each site's SuperNode authentication key: an EC key pair on a NIST curve, the private key in
  OpenSSH format (``flower-supernode --auth-supernode-private-key`` loads it with
  ``load_ssh_private_key``) and the public key as an OpenSSH line (``flwr supernode register``
  loads it with ``load_ssh_public_key``). The hospital keeps the private key; the operator
  registers the public key with the SuperLink.
- Each operator's TLS client certificate (``<name>.crt``, ``<name>.key``), signed by an operator
  CA (a second :func:`create_ca`), which the coordinator's gateway requires on its operator
  listener: the Control API is reachable only with it (see ``server/gateway.py``).

Private keys are written with mode 0600 and no file is replaced unless ``force`` is given.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PkiError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CURVES",
    "CertificateAuthority",
    "ClientCertificate",
    "ServerCertificate",
    "SiteKey",
    "create_ca",
    "certificate_sha1",
    "create_site_key",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_ca",
    "read_site_public_key",
    "ssh_fingerprint",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
# Flower accepts any NIST curve for SuperNode keys (flwr.supercore.primitives.asymmetric).
CURVES: dict[str, ec.EllipticCurve] = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}
_NIST_CURVES = {type(c) for c in CURVES.values()}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class CertificateAuthority:
    """The consortium CA as files, plus its loaded key and certificate."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class ServerCertificate:
    cert_path: Path
    key_path: Path
    ca_cert_path: Path
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: dt.datetime


@dataclass(frozen=True)
class ClientCertificate:
    """An operator's TLS client certificate (``clientAuth``) and its key."""

    name: str
    cert_path: Path
    key_path: Path
    ca_cert_path: Path
    fingerprint: str  # SHA-256, hex
    not_after: dt.datetime


@dataclass(frozen=True)
class SiteKey:
    site: str
    private_key_path: Path
    public_key_path: Path
    fingerprint: str  # "SHA256:<base64>", as `ssh-keygen -l` prints it


# ----------------------------------------------------------------------------- file helpers


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise PkiError(
            f"{kind} {value!r} is not valid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Check every output first, so that a refusal writes nothing."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"{', '.join(existing)} already exist(s); pass --force to replace")


def _prepare_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise PkiError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return out_dir


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write DATA to PATH; a private file is created 0600 (never world-readable, not even briefly)."""
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed a public file; keep modes exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _check_days(days: int) -> int:
    if not 1 <= days <= 36500:
        raise PkiError(f"validity must be between 1 and 36500 days, got {days}")
    return days


# ----------------------------------------------------------------------------- the CA


def create_ca(out_dir: Path, consortium: str, *, days: int = 3650, force: bool = False) -> CertificateAuthority:
    """Create the consortium's CA: ``OUT_DIR/ca.key`` (0600) and the self-signed ``ca.crt``.

    Parameters
    ----------
    out_dir : Path
        Directory for both files (created 0700 when absent).
    consortium : str
        The consortium's name, written into the CA's subject.
    days : int
        Validity of the CA certificate.
    force : bool
        Replace existing files.
    """
    _check_name("consortium", consortium)
    _check_days(days)
    out_dir = _prepare_dir(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _refuse_existing([cert_path, key_path], force)

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} federation CA"),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return CertificateAuthority(cert_path, key_path, cert, key)


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """The CA that :func:`create_ca` wrote to CA_DIR (``ca.crt`` and ``ca.key``), checked."""
    ca_dir = Path(ca_dir).expanduser()
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PkiError(f"no {path.name} in {ca_dir}; create the CA with `fedseg pki init-ca --out {ca_dir}`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise PkiError(f"{key_path} does not belong to {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    return CertificateAuthority(cert_path, key_path, cert, key)


def _sign_leaf(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """An end-entity certificate for KEY signed by CA: one extended key usage (server or client
    authentication, never both), valid for DAYS at most and never beyond the CA."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca.certificate.not_valid_after_utc)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                          crl_sign=False, content_commitment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.private_key, hashes.SHA384())


# ----------------------------------------------------------------------------- SuperLink TLS


def _parse_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    parsed = []
    for raw in ips:
        try:
            parsed.append(ipaddress.ip_address(raw))
        except ValueError as exc:
            raise PkiError(f"--ip {raw!r} is not an IP address") from exc
    return parsed


def _check_host(host: str) -> str:
    labels = host.rstrip(".").split(".")
    if not host or not all(re.fullmatch(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)", lab) for lab in labels):
        raise PkiError(f"--host {host!r} is not a DNS name (give IP addresses with --ip)")
    return host


def issue_server_certificate(
    ca_dir: Path,
    out_dir: Path,
    *,
    hosts: Sequence[str],
    ips: Sequence[str] = (),
    name: str = "superlink",
    days: int = 825,
    force: bool = False,
) -> ServerCertificate:
    """Sign a TLS server certificate for the SuperLink with the CA in CA_DIR.

    Writes ``OUT_DIR/<name>.crt``, ``OUT_DIR/<name>.key`` (0600) and a copy of the CA's
    certificate as ``OUT_DIR/ca.crt`` when OUT_DIR is another directory (the SuperLink's
    ``--ssl-ca-certfile``). Every host name and IP address the SuperNodes and the operator's
    ``flwr`` connect to must be among HOSTS and IPS: TLS checks the subject alternative names.
    """
    _check_name("certificate name", name)
    _check_days(days)
    dns = [_check_host(h) for h in hosts]
    addresses = _parse_ips(ips)
    if not dns and not addresses:
        raise PkiError("give at least one --host or --ip the SuperLink is reached at")
    ca = load_ca(ca_dir)
    out_dir = _prepare_dir(out_dir)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    ca_copy = out_dir / CA_CERT
    copy_ca = ca_copy.resolve() != ca.cert_path.resolve()
    _refuse_existing([cert_path, key_path, *([ca_copy] if copy_ca else [])], force)

    key = ec.generate_private_key(ec.SECP256R1())
    common_name = dns[0] if dns else str(addresses[0])
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = _sign_leaf(ca, key, common_name, days=days, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    if copy_ca:
        _write(ca_copy, ca.cert_path.read_bytes(), private=False)
    return ServerCertificate(cert_path, key_path, ca_copy if copy_ca else ca.cert_path,
                             tuple(dns), tuple(str(a) for a in addresses), cert.not_valid_after_utc)


# ----------------------------------------------------------------------------- operators


def issue_client_certificate(
    ca_dir: Path, out_dir: Path, *, name: str, days: int = 365, force: bool = False
) -> ClientCertificate:
    """Sign an operator's TLS client certificate with the CA in CA_DIR (the operator CA).

    Writes ``OUT_DIR/<name>.crt`` and ``OUT_DIR/<name>.key`` (0600): the credential the
    coordinator's gateway asks for on its operator listener (``fedseg coordinator gateway``),
    presented by ``fedseg coordinator tunnel``. The certificate is for client authentication
    only (extended key usage ``clientAuth``), so it can never serve as a server certificate.
    """
    _check_name("operator name", name)
    _check_days(days)
    ca = load_ca(ca_dir)
    out_dir = _prepare_dir(out_dir)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign_leaf(ca, key, name, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return ClientCertificate(name, cert_path, key_path, ca.cert_path,
                             cert.fingerprint(hashes.SHA256()).hex(), cert.not_valid_after_utc)


def certificate_sha1(path: Path) -> str:
    """The SHA-1 fingerprint of the PEM certificate at PATH, lower-case hex (nginx's
    ``$ssl_client_fingerprint``)."""
    path = Path(path).expanduser()
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path} is not a readable PEM certificate: {exc}") from exc
    return cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - an identifier, as nginx names it


# ----------------------------------------------------------------------------- SuperNode keys


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH key blob, as ``ssh-keygen -l`` prints it."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def create_site_key(
    out_dir: Path, site: str, *, curve: str = "p256", stem: str | None = None, force: bool = False
) -> SiteKey:
    """Create a site's SuperNode authentication key pair in OUT_DIR.

    ``<stem>.key`` (0600, OpenSSH private key, unencrypted because flower-supernode reads it
    without a passphrase) stays at the hospital; ``<stem>.key.pub`` (one OpenSSH line, the
    site's name as comment) goes to the operator, who registers it. STEM defaults to SITE.
    """
    _check_name("site name", site)
    stem = _check_name("file name stem", stem or site)
    if curve not in CURVES:
        raise PkiError(f"curve {curve!r} is not one of {sorted(CURVES)}")
    out_dir = _prepare_dir(out_dir)
    private_path, public_path = out_dir / f"{stem}.key", out_dir / f"{stem}.key.pub"
    _refuse_existing([private_path, public_path], force)
    key = ec.generate_private_key(CURVES[curve])
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    _write(public_path, public + f" {site}\n".encode(), private=False)
    return SiteKey(site, private_path, public_path, ssh_fingerprint(key.public_key()))


def read_site_public_key(path: Path) -> tuple[ec.EllipticCurvePublicKey, str]:
    """Load a site's ``.pub`` file as ``flwr supernode register`` will: key and comment.

    Raises :class:`PkiError` for a missing file, a private key given by mistake, a key that is
    not EC or not on a NIST curve.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PkiError(f"public key file {path} does not exist")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise PkiError(f"{path} holds a PRIVATE key: send and register only the .pub file")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path} is not an OpenSSH public key line: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or type(key.curve) not in _NIST_CURVES:
        raise PkiError(f"{path}: SuperNode keys must be EC keys on a NIST curve (P-256, P-384, P-521)")
    parts = data.decode(errors="replace").split()
    comment = " ".join(parts[2:]) if len(parts) > 2 else ""
    return key, comment
