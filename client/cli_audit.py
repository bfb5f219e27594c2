"""`fedseg site audit ...` and `fedseg site app-hash / app-sign`: the site's own records and
which apps it trusts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app_trust import fab_file_identity, identify_app, sign_app
from .audit import AuditLog, default_audit_path, verify_audit_log
from .errors import AuditError, PolicyError

__all__ = ["audit", "app_hash", "app_sign"]


def _audit_file(audit_file: Path | None, site_name: str | None) -> Path:
    if audit_file is None:
        if not site_name:
            raise click.UsageError("give --audit-file or --site-name")
        audit_file = default_audit_path(site_name)
    if not audit_file.is_file():
        raise click.ClickException(f"no audit log at {audit_file}")
    return audit_file


_FILE = click.option("--audit-file", type=click.Path(path_type=Path), default=None,
                     help="Default: $FEDSEG_HOME/audit/<site-name>.jsonl (the node's audit-file).")
_NAME = click.option("--site-name", default=None, help="Site name, to find the default audit log.")
_FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")


@click.group("audit")
def audit() -> None:
    """The site's hash-chained audit log: every run, round, refusal and data access."""


@audit.command("verify")
@_FILE
@_NAME
@click.option("--expect-head", default=None, metavar="SEQ:HASH",
              help="A head recorded earlier elsewhere: it must still be in the chain.")
@_FORMAT
def verify(audit_file: Path | None, site_name: str | None, expect_head: str | None, fmt: str) -> None:
    """Check every line's hash and the chain; exit 1 naming the first bad line."""
    path = _audit_file(audit_file, site_name)
    try:
        report = verify_audit_log(path, expect_head=expect_head)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    elif report.ok:
        click.echo(f"OK {path}: {report.lines} records, head {report.head_seq}:{report.head_hash}")
    else:
        click.echo(f"BROKEN {path}: line {report.bad_line}: {report.reason}\n"
                   f"  the chain is intact up to seq {report.head_seq} ({report.head_hash})")
    if not report.ok:
        raise SystemExit(1)


@audit.command("show")
@_FILE
@_NAME
@click.option("--run-id", default=None, help="Only this run's records.")
@click.option("--event", "events", multiple=True, help="Only these events (repeatable).")
@_FORMAT
def show(audit_file: Path | None, site_name: str | None, run_id: str | None, events: tuple[str, ...],
         fmt: str) -> None:
    """Print the audit records (not verified: use `verify`)."""
    path = _audit_file(audit_file, site_name)
    try:
        records = AuditLog(path).records()
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    records = [r for r in records if (run_id is None or str(r.get("run_id")) == run_id)
               and (not events or r.get("event") in events)]
    if fmt == "json":
        click.echo(json.dumps(records, indent=2, sort_keys=True))
        return
    skip = {"seq", "time", "event", "prev", "hash", "run_id", "round", "kind"}
    for r in records:
        where = " ".join(f"{k}={r[k]}" for k in ("run_id", "round", "kind") if k in r)
        rest = json.dumps({k: v for k, v in r.items() if k not in skip}, sort_keys=True)
        click.echo(f"{r.get('seq'):>5} {r.get('time')} {r.get('event'):<13} {where} {rest}")


@click.command("app-hash")
@click.argument("app", type=click.Path(exists=True, path_type=Path), default=Path("."))
@_FORMAT
def app_hash(app: Path, fmt: str) -> None:
    """The hashes of a Flower app (a folder or a .fab) for [apps] allowed_hashes."""
    try:
        identity = fab_file_identity(app) if app.is_file() else identify_app(app)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from exc
    if identity.error:
        raise click.ClickException(identity.error)
    if fmt == "json":
        click.echo(json.dumps(identity.to_record(), indent=2, sort_keys=True))
        return
    click.echo(f"app           {identity.fab_id} {identity.fab_version}")
    click.echo(f"fab hash      sha256:{identity.fab_sha256}")
    click.echo(f"content hash  sha256:{identity.content_sha256}")
    signer = identity.signature.get("fingerprint", "?") if identity.signature else "not signed"
    click.echo(f"signed by     {signer}")


@click.command("app-sign")
@click.argument("app_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("."))
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The publisher's Ed25519 private key (PEM PKCS8, e.g. from `fedseg registry keygen`).")
@click.option("--passphrase-env", default=None, help="Environment variable holding the key's passphrase.")
def app_sign(app_dir: Path, key_file: Path, passphrase_env: str | None) -> None:
    """Sign a Flower app folder (writes app-signature.json; then `flwr build` / `flwr run`)."""
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    passphrase = os.environ.get(passphrase_env, "").encode() if passphrase_env else None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=passphrase or None)
    except (TypeError, ValueError) as exc:
        raise click.ClickException(f"cannot load the private key {key_file}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise click.ClickException(f"{key_file} is not an Ed25519 private key")
    try:
        path = sign_app(app_dir, key)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"signed {app_dir}: {path}")
