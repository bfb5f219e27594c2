"""`fedseg site`: what a hospital node has done, from the hospital's side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imaging.home import fedseg_home

__all__ = ["site"]


@click.group("site")
def site() -> None:
    """Hospital site node: privacy ledger (more in later releases)."""


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
