"""`fedseg site`: what a hospital node has done, from the hospital's side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imaging.home import fedseg_home

from .cli_audit import app_hash, app_sign, audit

__all__ = ["site"]


@click.group("site")
def site() -> None:
    """Hospital site node: data check, privacy ledger."""


site.add_command(audit)
site.add_command(app_hash)
site.add_command(app_sign)


@site.group("ledger")
def ledger() -> None:
    """The site's durable privacy ledger (every DP-SGD round, composed across runs)."""


@ledger.command("show")
@click.option("--ledger-file", type=click.Path(path_type=Path), default=None,
              help="Default: $FEDSEG_HOME/ledgers/<site-name>.json (the node's ledger-file).")
@click.option("--site-name", default=None, help="Site name, to find the default ledger file.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def show(ledger_file: Path | None, site_name: str | None, fmt: str) -> None:
    """Print the ε spent per consortium and model, and every recorded round."""
    from privacy import LedgerError, PrivacyLedger

    if ledger_file is None:
        if not site_name:
            raise click.UsageError("give --ledger-file or --site-name")
        ledger_file = fedseg_home() / "ledgers" / f"{site_name}.json"
    if not ledger_file.is_file():
        raise click.ClickException(f"no privacy ledger at {ledger_file} (no DP round has run there yet)")
    try:
        data = PrivacyLedger(ledger_file).to_dict()
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from exc
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"ledger {ledger_file}")
    for consortium, models in sorted(data.get("summary", {}).items()):
        for model, row in sorted(models.items()):
            click.echo(f"  {consortium} / {model}: epsilon {row['epsilon']:.3f} at delta {row['delta']:.2g}"
                       f" ({row['entries']} rounds, {row['steps']} steps)")


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
