"""`fedseg pki`: a real CA, a TLS handshake with the SuperLink certificate, keys Flower loads."""

from __future__ import annotations

import shlex
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.cli import pki
from privacy.errors import PkiError
from privacy.pki import create_ca, create_site_key, issue_server_certificate, load_ca


def _invoke(*args: str):
    return CliRunner().invoke(pki, list(args))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    out = tmp_path / "ca"
    result = _invoke("init-ca", "--out", str(out), "--consortium", "brain-consortium")
    assert result.exit_code == 0, result.output
    return out


def _tls_roundtrip(cert: Path, key: Path, ca: Path, server_hostname: str) -> str:
    """A TLS handshake over loopback: server with CERT/KEY, client trusting only CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    return tls.recv(5).decode()
        finally:
            thread.join(timeout=10)


def test_ca_and_superlink_certificate_make_a_verified_tls_connection(ca_dir: Path, tmp_path: Path) -> None:
    assert _mode(ca_dir / "ca.key") == 0o600 and _mode(ca_dir / "ca.crt") == 0o644
    tls = tmp_path / "tls"
    result = _invoke("superlink-cert", "--ca", str(ca_dir), "--host", "localhost",
                     "--host", "superlink.example.org", "--ip", "127.0.0.1", "--out", str(tls))
    assert result.exit_code == 0, result.output
    assert _mode(tls / "superlink.key") == 0o600
    # the CA travels with the certificate: the SuperLink's --ssl-ca-certfile
    assert (tls / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    # the printed command starts the SuperLink with these files and SuperNode authentication
    assert f"--ssl-certfile {tls.resolve() / 'superlink.crt'}" in result.output
    assert "--enable-supernode-auth" in result.output

    cert = x509.load_pem_x509_certificate((tls / "superlink.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    assert _tls_roundtrip(tls / "superlink.crt", tls / "superlink.key", ca_dir / "ca.crt", "localhost") == "hello"
    assert _tls_roundtrip(tls / "superlink.crt", tls / "superlink.key", ca_dir / "ca.crt", "127.0.0.1") == "hello"
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _tls_roundtrip(tls / "superlink.crt", tls / "superlink.key", ca_dir / "ca.crt", "evil.example.org")
    # a client trusting another consortium's CA refuses the certificate
    other = create_ca(tmp_path / "other", "other-consortium")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _tls_roundtrip(tls / "superlink.crt", tls / "superlink.key", other.cert_path, "localhost")


def test_site_key_is_what_flower_loads_and_the_printed_steps_register_it(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = tmp_path / "keys"
    result = _invoke("site-key", "--site", "hospital-a", "--out", str(keys))
    assert result.exit_code == 0, result.output
    private_path, public_path = keys / "hospital-a.key", keys / "hospital-a.key.pub"
    assert _mode(private_path) == 0o600

    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, an EC key
    private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    # flwr supernode register: its own loader accepts the .pub file, and it is the same key
    assert try_load_public_key(public_path) == public_key_to_bytes(private.public_key())
    assert public_path.read_text().split()[2] == "hospital-a"

    steps = _invoke("register-steps", str(public_path), "--connection", "consortium",
                    "--address", "link.example.org:8000", "--root-certificates", str(tmp_path / "ca.crt"))
    assert steps.exit_code == 0, steps.output
    (command,) = [line for line in steps.output.splitlines() if line.startswith("flwr ")]
    assert shlex.split(command) == ["flwr", "supernode", "register", str(public_path.resolve()),
                                    "consortium", "--name", "hospital-a"]
    assert 'address = "link.example.org:8000"' in steps.output


def test_nothing_is_overwritten_without_force(ca_dir: Path, tmp_path: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    again = _invoke("init-ca", "--out", str(ca_dir), "--consortium", "brain-consortium")
    assert again.exit_code != 0 and "already exist" in again.output and "--force" in again.output
    assert (ca_dir / "ca.key").read_bytes() == before
    forced = _invoke("init-ca", "--out", str(ca_dir), "--consortium", "brain-consortium", "--force")
    assert forced.exit_code == 0, forced.output
    assert (ca_dir / "ca.key").read_bytes() != before and _mode(ca_dir / "ca.key") == 0o600

    create_site_key(tmp_path / "k", "site-b")
    with pytest.raises(PkiError, match="already exist"):
        create_site_key(tmp_path / "k", "site-b")


def test_bad_input_is_refused_clearly(ca_dir: Path, tmp_path: Path) -> None:
    missing = _invoke("superlink-cert", "--ca", str(tmp_path / "nope"), "--host", "localhost",
                      "--out", str(tmp_path / "t"))
    assert missing.exit_code != 0 and "no ca.crt" in missing.output and "init-ca" in missing.output
    no_names = _invoke("superlink-cert", "--ca", str(ca_dir), "--out", str(tmp_path / "t"))
    assert no_names.exit_code != 0 and "at least one --host or --ip" in no_names.output
    bad_ip = _invoke("superlink-cert", "--ca", str(ca_dir), "--ip", "300.1.1.1", "--out", str(tmp_path / "t"))
    assert bad_ip.exit_code != 0 and "'300.1.1.1' is not an IP address" in bad_ip.output
    bad_site = _invoke("site-key", "--site", "../etc", "--out", str(tmp_path / "k"))
    assert bad_site.exit_code != 0 and "site name '../etc' is not valid" in bad_site.output

    # a private key sent instead of the public one, and a non-NIST key
    key = create_site_key(tmp_path / "k", "site-c")
    wrong = _invoke("register-steps", str(key.private_key_path))
    assert wrong.exit_code != 0 and "PRIVATE key" in wrong.output
    ed = tmp_path / "ed25519.pub"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    not_ec = _invoke("register-steps", str(ed))
    assert not_ec.exit_code != 0 and "NIST curve" in not_ec.output

    # a CA directory whose key belongs to another certificate
    other = create_ca(tmp_path / "other", "other-consortium")
    (ca_dir / "ca.key").write_bytes(other.key_path.read_bytes())
    with pytest.raises(PkiError, match="does not belong to"):
        load_ca(ca_dir)
    with pytest.raises(PkiError, match="does not belong to"):
        issue_server_certificate(ca_dir, tmp_path / "t", hosts=["localhost"])
