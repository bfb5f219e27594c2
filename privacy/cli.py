"""`fedseg pki`: the consortium CA, the SuperLink's TLS certificate, the sites' SuperNode keys."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from .cli_enrolment import enrol_site, list_sites, sign_site_manifest
from .errors import PkiError
from .pki import (
    CURVES,
    create_ca,
    create_site_key,
    issue_client_certificate,
    issue_server_certificate,
    read_site_public_key,
    ssh_fingerprint,
)

__all__ = ["pki", "registration_steps"]

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group("pki")
def pki() -> None:
    """Keys and certificates for a real federation (TLS and SuperNode authentication).

    \b
    Operator:  init-ca, superlink-cert, operator-cert, register-steps (then `flwr supernode register`),
               enrol (a site's signed manifest, checked against its registered key), sites
    Hospital:  site-key (keeps the .key, sends the .key.pub to the operator),
               sign-manifest (the manifest of `fedseg site check`, signed with the node key)
    """


def _fail(exc: PkiError) -> click.ClickException:
    return click.ClickException(str(exc))


@pki.command("init-ca")
@click.option("--out", "out_dir", required=True, type=_DIR, help="Directory for ca.crt and ca.key.")
@click.option("--consortium", required=True, help="The consortium's name (in the CA's subject).")
@click.option("--days", default=3650, show_default=True, help="Validity of the CA certificate.")
@click.option("--force", is_flag=True, help="Replace existing files.")
def init_ca(out_dir: Path, consortium: str, days: int, force: bool) -> None:
    """Create the consortium CA: ca.key (0600, keep it offline) and ca.crt (give it to everyone)."""
    try:
        ca = create_ca(out_dir, consortium, days=days, force=force)
    except PkiError as exc:
        raise _fail(exc) from None
    click.echo(f"CA certificate  {ca.cert_path.resolve()}  (sha256 {ca.fingerprint})")
    click.echo(f"CA private key  {ca.key_path.resolve()}  (0600: keep it offline once certificates are issued)")
    click.echo("")
    click.echo("Next: the SuperLink's TLS certificate, naming every host and IP the sites dial, and localhost:")
    click.echo(f"  fedseg pki superlink-cert --ca {shlex.quote(str(out_dir))} --host superlink.example.org "
               "--host localhost --ip 127.0.0.1 --out superlink-tls")
    click.echo(f"Give {ca.cert_path.name} to every hospital (flower-supernode --root-certificates) and to "
               "each operator's tunnel (fedseg coordinator tunnel --ca).")


@pki.command("superlink-cert")
@click.option("--ca", "ca_dir", required=True, type=_DIR, help="Directory holding ca.crt and ca.key.")
@click.option("--host", "hosts", multiple=True, help="DNS name of the SuperLink (repeatable).")
@click.option("--ip", "ips", multiple=True, help="IP address of the SuperLink (repeatable).")
@click.option("--out", "out_dir", required=True, type=_DIR, help="Directory for the certificate and key.")
@click.option("--name", default="superlink", show_default=True, help="File name stem: NAME.crt, NAME.key.")
@click.option("--days", default=825, show_default=True, help="Validity (capped at the CA's).")
@click.option("--force", is_flag=True, help="Replace existing files.")
def superlink_cert(ca_dir: Path, hosts: tuple[str, ...], ips: tuple[str, ...], out_dir: Path,
                   name: str, days: int, force: bool) -> None:
    """Sign the SuperLink's TLS server certificate with the consortium CA."""
    try:
        issued = issue_server_certificate(ca_dir, out_dir, hosts=hosts, ips=ips, name=name,
                                          days=days, force=force)
    except PkiError as exc:
        raise _fail(exc) from None
    cert, key, ca = (p.resolve() for p in (issued.cert_path, issued.key_path, issued.ca_cert_path))
    sans = [*issued.dns_names, *issued.ip_addresses]
    click.echo(f"certificate  {cert}  (valid until {issued.not_after:%Y-%m-%d}; names: {', '.join(sans)})")
    click.echo(f"private key  {key}  (0600)")
    click.echo(f"CA           {ca}")
    click.echo("")
    click.echo("Start the SuperLink with TLS, SuperNode authentication and durable state, on loopback only")
    click.echo("(its port serves the Control API too), and the gateway in front of it:")
    click.echo(f"  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flower-superlink \\\n"
               f"      --ssl-ca-certfile {shlex.quote(str(ca))} --ssl-certfile {shlex.quote(str(cert))} "
               f"--ssl-keyfile {shlex.quote(str(key))} \\\n"
               "      --enable-supernode-auth --database /var/lib/fedseg/superlink.db \\\n"
               "      --disable-runtime-dependency-installation --host 127.0.0.1 --port 9091")
    click.echo(f"  fedseg coordinator gateway --cert {shlex.quote(str(cert))} --key {shlex.quote(str(key))} "
               f"--ca {shlex.quote(str(ca))} --operator-ca OPERATOR_CA/ca.crt --out gateway.conf")


@pki.command("operator-cert")
@click.option("--ca", "ca_dir", required=True, type=_DIR,
              help="The operator CA's directory (a second `init-ca`, never given to hospitals).")
@click.option("--name", required=True, help="The operator's name (certificate subject and file stem).")
@click.option("--out", "out_dir", required=True, type=_DIR, help="Directory for NAME.crt and NAME.key.")
@click.option("--days", default=365, show_default=True, help="Validity (capped at the CA's).")
@click.option("--force", is_flag=True, help="Replace existing files.")
def operator_cert(ca_dir: Path, name: str, out_dir: Path, days: int, force: bool) -> None:
    """Sign an operator's TLS client certificate: the gateway's operator listener requires it."""
    try:
        issued = issue_client_certificate(ca_dir, out_dir, name=name, days=days, force=force)
    except PkiError as exc:
        raise _fail(exc) from None
    cert, key = issued.cert_path.resolve(), issued.key_path.resolve()
    click.echo(f"certificate  {cert}  (client authentication; valid until {issued.not_after:%Y-%m-%d}; "
               f"sha256 {issued.fingerprint})")
    click.echo(f"private key  {key}  (0600: only on this operator's workstation)")
    click.echo("")
    click.echo("The operator reaches the Control API through the gateway's operator listener:")
    click.echo(f"  fedseg coordinator tunnel --gateway superlink.example.org:9443 --ca ca.crt "
               f"--cert {shlex.quote(str(cert))} --key {shlex.quote(str(key))}")


@pki.command("site-key")
@click.option("--site", required=True, help="The site's name (the key's comment and default file name).")
@click.option("--out", "out_dir", required=True, type=_DIR, help="Directory for SITE.key and SITE.key.pub.")
@click.option("--curve", type=click.Choice(sorted(CURVES)), default="p256", show_default=True,
              help="NIST curve of the EC key.")
@click.option("--stem", default=None, help="File name stem instead of the site name.")
@click.option("--force", is_flag=True, help="Replace existing files.")
def site_key(site: str, out_dir: Path, curve: str, stem: str | None, force: bool) -> None:
    """Create this site's SuperNode authentication key pair (run it at the hospital)."""
    try:
        key = create_site_key(out_dir, site, curve=curve, stem=stem, force=force)
    except PkiError as exc:
        raise _fail(exc) from None
    private, public = key.private_key_path.resolve(), key.public_key_path.resolve()
    click.echo(f"private key  {private}  (0600: stays on this node)")
    click.echo(f"public key   {public}  ({key.fingerprint})")
    click.echo("")
    click.echo(f"1. Send {public.name} to the operator; confirm the fingerprint {key.fingerprint} by phone.")
    click.echo("2. The operator registers it (see `fedseg pki register-steps`):")
    click.echo(f"     flwr supernode register {shlex.quote(public.name)} <connection> --name {shlex.quote(site)}")
    click.echo(f"3. Start the SuperNode with --auth-supernode-private-key {shlex.quote(str(private))}")


def registration_steps(public_keys: list[Path], connection: str, address: str | None,
                       root_certificates: Path | None) -> list[str]:
    """The operator's registration steps for PUBLIC_KEYS, as printable lines.

    Every ``flwr supernode register ...`` line is a complete command (the names come from the
    keys' comments, as ``fedseg pki site-key`` writes them).
    """
    # Without an explicit address: the operator's tunnel to the gateway (plain HTTP on loopback).
    tls = (f"#      root-certificates = \"{root_certificates.resolve()}\"" if root_certificates
           else "#      insecure = true   # loopback to `fedseg coordinator tunnel`, which uses TLS")
    lines = [
        "# 1. A connection to the Control API (the gateway's operators' address, through your tunnel)",
        "#    in $FLWR_HOME/config.toml (default ~/.flwr/config.toml):",
        f"#      [superlink.{connection}]",
        f"#      address = \"{address or '127.0.0.1:9093'}\"",
        tls,
        "# 2. Register each site's public key (check each fingerprint with its hospital first):",
    ]
    for path in public_keys:
        key, comment = read_site_public_key(path)
        name = comment.split()[0] if comment else path.name.removesuffix(".pub").removesuffix(".key")
        lines.append(f"#    {name}: {ssh_fingerprint(key)}")
        lines.append(
            f"flwr supernode register {shlex.quote(str(path.resolve()))} {shlex.quote(connection)} "
            f"--name {shlex.quote(name)}"
        )
    lines.append(f"# 3. Check: flwr supernode list {shlex.quote(connection)}"
                 "   (a node shows up online once its SuperNode connects)")
    return lines


@pki.command("register-steps")
@click.argument("public_keys", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--connection", default="fedseg", show_default=True,
              help="Name of the SuperLink connection in $FLWR_HOME/config.toml.")
@click.option("--address", default=None,
              help="The Control API's host:port, for the connection snippet (default: the tunnel's).")
@click.option("--root-certificates", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The consortium's ca.crt, for the connection snippet (default: insecure, the tunnel's loopback).")
def register_steps(public_keys: tuple[Path, ...], connection: str, address: str | None,
                   root_certificates: Path | None) -> None:
    """Print how the operator registers the sites' public keys with the SuperLink.

    With --enable-supernode-auth the SuperLink accepts only SuperNodes whose public key was
    registered through its Control API (`flwr supernode register`); each key is checked here first.
    """
    try:
        lines = registration_steps(list(public_keys), connection, address, root_certificates)
    except PkiError as exc:
        raise _fail(exc) from None
    click.echo("\n".join(lines))


pki.add_command(sign_site_manifest)
pki.add_command(enrol_site)
pki.add_command(list_sites)
