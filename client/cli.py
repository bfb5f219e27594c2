"""`fedseg site`: what a hospital node has done, from the hospital's side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imaging.home import fedseg_home

from .cli_audit import app_hash, app_sign, audit
from .cli_runner import runner

__all__ = ["site"]


@click.group("site")
def site() -> None:
    """Hospital site node: data check, privacy ledger, audit log, the app-checking runner."""


site.add_command(audit)
site.add_command(app_hash)
site.add_command(app_sign)
site.add_command(runner)


@site.group("ledger")
def ledger() -> None:
    """The site's durable privacy ledger (every DP-SGD round on its data, composed across runs)."""


_LEDGER_FILE = click.option("--ledger-file", type=click.Path(path_type=Path), default=None,
                            help="Default: $FEDSEG_HOME/ledgers/<site-name>.json (the node's ledger-file).")
_SITE_NAME = click.option("--site-name", default=None, help="Site name, to find the default files.")
_SITE_CONFIG = click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                            default=None, help="The node's site.toml (its ledger_file and audit_log).")
_FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")


def _ledger_paths(ledger_file: Path | None, audit_file: Path | None, site_name: str | None,
                  config_file: Path | None) -> tuple[Path, Path | None]:
    """The ledger and audit log files: given, from site.toml, or the site name's defaults."""
    from .audit import default_audit_path

    if config_file is not None:
        from .errors import SiteConfigError
        from .site_config import load_site_config

        try:
            node_site = load_site_config(config_file)
        except SiteConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        return ledger_file or node_site.ledger_path, audit_file or node_site.audit_path
    if ledger_file is None and not site_name:
        raise click.UsageError("give --config, --ledger-file or --site-name")
    ledger_file = ledger_file or fedseg_home() / "ledgers" / f"{site_name}.json"
    return ledger_file, audit_file or (default_audit_path(site_name) if site_name else None)


@ledger.command("show")
@_LEDGER_FILE
@_SITE_NAME
@_SITE_CONFIG
@_FORMAT
def show(ledger_file: Path | None, site_name: str | None, config_file: Path | None, fmt: str) -> None:
    """Print the ε spent per budget scope, the names the runs used, and every recorded round.

    A ledger that fails `verify` against the audit log is still shown, under a warning.
    """
    from privacy import LedgerError, PrivacyLedger, verify_ledger

    from .audit import AuditLog
    from .ledger_anchor import AuditLedgerAnchor

    ledger_file, audit_file = _ledger_paths(ledger_file, None, site_name, config_file)
    if not ledger_file.is_file():
        raise click.ClickException(f"no privacy ledger at {ledger_file} (no DP round has run there yet)")
    try:
        data = PrivacyLedger(ledger_file).to_dict()
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from exc
    anchor = AuditLedgerAnchor(AuditLog(audit_file)) if audit_file is not None else None
    report = verify_ledger(ledger_file, anchor)
    if fmt == "json":
        click.echo(json.dumps({**data, "verified": report.to_dict()}, indent=2, sort_keys=True))
        return
    if not report.ok:
        click.echo(f"WARNING: {report.reason}", err=True)
    click.echo(f"ledger {ledger_file} (head {data['head']['entries']}:{data['head']['hash']})")
    for scope, row in sorted(data.get("summary", {}).items()):
        click.echo(f"  scope {scope}: epsilon {row['epsilon']:.3f} at delta {row['delta']:.2g}"
                   f" ({row['entries']} rounds, {row['steps']} steps; runs as {', '.join(row['runs_as'])})")


@ledger.command("verify")
@_LEDGER_FILE
@click.option("--audit-file", type=click.Path(path_type=Path), default=None,
              help="Default: $FEDSEG_HOME/audit/<site-name>.jsonl (the node's audit-file).")
@_SITE_NAME
@_SITE_CONFIG
@_FORMAT
def verify(ledger_file: Path | None, audit_file: Path | None, site_name: str | None,
           config_file: Path | None, fmt: str) -> None:
    """Check the ledger's hash chain and that it still holds every head anchored in the audit log.

    Exits 1 when the ledger was edited, truncated, rolled back, replaced or deleted: the node then
    refuses every DP round until it is restored from a backup.
    """
    from privacy import verify_ledger

    from .audit import AuditLog
    from .errors import AuditError
    from .ledger_anchor import AuditLedgerAnchor

    ledger_file, audit_file = _ledger_paths(ledger_file, audit_file, site_name, config_file)
    anchor = AuditLedgerAnchor(AuditLog(audit_file)) if audit_file is not None else None
    try:
        result = verify_ledger(ledger_file, anchor)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from exc
    if fmt == "json":
        click.echo(json.dumps({"ledger": str(ledger_file), "audit_log": str(audit_file) if audit_file else None,
                               **result.to_dict()}, indent=2, sort_keys=True))
    elif result.ok:
        anchored = (f"{result.anchors} anchors in {audit_file}, last {result.last_anchor}"
                    if result.last_anchor else f"no anchor in {audit_file or 'any audit log'}")
        state = "" if result.exists else " (no file yet)"
        migrated = " (version 1: rewritten as version 2 at the next DP round)" if result.version == 1 else ""
        click.echo(f"OK {ledger_file}{state}{migrated}: head {result.head}; {anchored}")
    else:
        click.echo(f"REFUSED {ledger_file}: {result.reason}")
    if not result.ok:
        raise SystemExit(1)


@site.command("check")
@click.option("--config", "config_file", required=True,
              type=click.Path(path_type=Path, dir_okay=False),
              help="The node's site.toml ([site], [source], [selection]).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--manifest-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the shareable manifest "
                   "(default: $FEDSEG_HOME/manifests/<site-name>.json).")
def check(config_file: Path, fmt: str, manifest_out: Path | None) -> None:
    """What the node would train on, every problem per file, and a manifest without PHI.

    Exits 1 when nothing usable (a selected, readable series with a SEG) is found.
    """
    from imaging.errors import ImagingError

    from .errors import ClientError
    from .site_check import check_site
    from .site_config import load_site_config

    try:
        node_site = load_site_config(config_file)
        result = check_site(node_site)
    except (ClientError, ImagingError) as exc:
        raise click.ClickException(str(exc)) from exc
    manifest_out = manifest_out or fedseg_home() / "manifests" / f"{node_site.name}.json"
    manifest_out.parent.mkdir(parents=True, exist_ok=True)
    manifest_out.write_text(json.dumps(result.manifest(), indent=2, sort_keys=True) + "\n")
    if fmt == "json":
        click.echo(json.dumps({**result.report(), "manifest": str(manifest_out)}, indent=2))
    else:
        click.echo(result.table())
        click.echo(f"manifest (shareable with the coordinator): {manifest_out}")
    if not result.usable:
        click.get_current_context().exit(1)
