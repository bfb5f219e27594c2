"""The gateway's configuration and the operator's credentials, without processes: the paths each
listener forwards against flwr's own route table, refusals of unsafe specs, operator
certificates, the tunnel's own refusals, and nginx's verdict on what the generator writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from privacy.errors import PkiError
from privacy.pki import certificate_sha1, create_ca, issue_client_certificate, issue_server_certificate
from server.cli import coordinator
from server.errors import GatewayError
from server.gateway import CONTROL_PATH, FLEET_PATH, GatewaySpec, Listener, parse_listener, render_nginx_conf
from server.operator_tunnel import TunnelSpec, client_context


def _superlink_routes() -> dict[str, set[str]]:
    """Every path the flwr 1.41 SuperLink serves, by API (its routers, as its app includes them)."""
    from flwr.supercore.routers.health.router import router as health
    from flwr.supercore.routers.runtime.responses import router as responses
    from flwr.supercore.routers.runtime.router import router as runtime
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet

    return {
        "fleet": {r.path for r in fleet.routes},
        "control": {r.path for r in control.routes},
        "runtime": {r.path for r in runtime.routes} | {r.path for r in responses.routes},
        "other": {r.path for r in health.routes} | {"/docs", "/docs/oauth2-redirect", "/openapi.json"},
    }


def test_the_sites_listener_forwards_exactly_the_fleet_api() -> None:
    routes = _superlink_routes()
    assert len(routes["fleet"]) >= 12 and len(routes["control"]) >= 40 and len(routes["runtime"]) >= 20
    for path in routes["fleet"]:
        assert re.match(FLEET_PATH, path) and not re.match(CONTROL_PATH, path), path
    for path in routes["control"]:
        assert re.match(CONTROL_PATH, path) and not re.match(FLEET_PATH, path), path
    for path in routes["runtime"] | routes["other"]:
        assert not re.match(FLEET_PATH, path) and not re.match(CONTROL_PATH, path), path


def _spec(**overrides: object) -> GatewaySpec:
    values: dict[str, object] = dict(certificate="/certs/superlink.crt", certificate_key="/certs/superlink.key",
                                     ca_certificate="/certs/ca.crt", operator_ca="/certs/operator-ca.crt")
    values.update(overrides)
    return GatewaySpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"superlink": Listener("0.0.0.0", 9091)}, "the SuperLink must listen on loopback"),
    ({"superlink": Listener("10.0.0.5", 9091)}, "the SuperLink must listen on loopback"),
    ({"operator_listen": Listener("10.0.0.5", 8000)}, "three distinct ports"),
    ({"certificate": "/certs/x.crt; include /etc/passwd"}, "certificate"),
    ({"operator_ca": '/certs/ca.crt"'}, "operator_ca"),
    ({"max_body": "lots"}, "not an nginx size"),
    ({"operator_fingerprints": ("AB:CD",)}, "40 lower-case hex"),
])
def test_unsafe_gateway_specs_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(GatewayError, match=re.escape(message)):
        _spec(**overrides)


@pytest.mark.parametrize("value", ["superlink:8000", "0.0.0.0", "1.2.3.4:70000", "[zz]:1"])
def test_listeners_are_ip_and_port(value: str) -> None:
    with pytest.raises(GatewayError, match="--x"):
        parse_listener(value, "--x")
    assert parse_listener("[::1]:9443", "--x") == Listener("::1", 9443)


def test_the_cli_refuses_a_superlink_off_loopback() -> None:
    result = CliRunner().invoke(coordinator, [
        "gateway", "--superlink", "0.0.0.0:9091", "--cert", "a.crt", "--key", "a.key", "--ca", "ca.crt",
        "--operator-ca", "op.crt"])
    assert result.exit_code != 0 and "the SuperLink must listen on loopback" in result.output, result.output


def test_operator_certificates_authenticate_clients_only(tmp_path: Path) -> None:
    operator_ca = create_ca(tmp_path / "operator-ca", "consortium-operators")
    issued = issue_client_certificate(tmp_path / "operator-ca", tmp_path / "ops", name="alice")
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == operator_ca.certificate.subject
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert os.stat(issued.key_path).st_mode & 0o777 == 0o600
    assert certificate_sha1(issued.cert_path) == cert.fingerprint(hashes.SHA1()).hex()
    with pytest.raises(PkiError, match="already exist"):
        issue_client_certificate(tmp_path / "operator-ca", tmp_path / "ops", name="alice")
    # the SuperLink's certificate is for server authentication only (the same signer)
    server = issue_server_certificate(tmp_path / "operator-ca", tmp_path / "tls", hosts=["localhost"])
    server_cert = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
    assert list(server_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]


def test_the_tunnel_listens_on_loopback_only_and_checks_its_files(tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match="must listen on loopback"):
        TunnelSpec("gw", 9443, tmp_path / "ca.crt", tmp_path / "a.crt", tmp_path / "a.key", Listener("0.0.0.0", 9093))
    with pytest.raises(GatewayError, match="does not exist"):
        client_context(TunnelSpec("gw", 9443, tmp_path / "ca.crt", tmp_path / "a.crt", tmp_path / "a.key"))


def _nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@pytest.mark.skipif(_nginx() is None and os.environ.get("CI", "") in ("", "0", "false"),
                    reason="Debian's nginx is not installed (.ci/run installs it)")
@pytest.mark.parametrize("allow_list", [False, True])
def test_nginx_accepts_the_generated_configuration(tmp_path: Path, allow_list: bool) -> None:
    assert _nginx(), "nginx is not installed; CI must test the gateway"
    create_ca(tmp_path / "ca", "consortium")
    tls = issue_server_certificate(tmp_path / "ca", tmp_path / "tls", hosts=["localhost"], ips=["127.0.0.1"])
    create_ca(tmp_path / "operator-ca", "consortium-operators")
    alice = issue_client_certificate(tmp_path / "operator-ca", tmp_path / "ops", name="alice")
    spec = GatewaySpec(
        certificate=str(tls.cert_path), certificate_key=str(tls.key_path), ca_certificate=str(tls.ca_cert_path),
        operator_ca=str(tmp_path / "operator-ca" / "ca.crt"), site_listen=Listener("127.0.0.1", 18000),
        operator_listen=Listener("127.0.0.1", 19443), superlink=Listener("127.0.0.1", 19091),
        operator_fingerprints=(certificate_sha1(alice.cert_path),) if allow_list else (),
        runtime_dir=str(tmp_path), access_log=str(tmp_path / "access.log"),
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(spec))
    checked = subprocess.run([_nginx() or "nginx", "-t", "-c", str(conf), "-e", "stderr"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    text = conf.read_text()
    assert f"# regenerate with:\n#   {spec.command()}\n" in text
    assert ("map $ssl_client_fingerprint" in text) is allow_list
    # exactly two proxied API locations: the Fleet API on the sites' server, the Control API on
    # the operators' server, which verifies client certificates; the Runtime API on neither
    site, operator = text.split("    server {")[1:]
    assert f'location ~ "{FLEET_PATH}"' in site and "/v1/control" not in site and "ssl_verify_client" not in site
    assert f'location ~ "{CONTROL_PATH}"' in operator and "/v1/fleet" not in operator
    assert "ssl_verify_client on;" in operator
    assert "/v1/runtime" not in text
