"""`fedseg registry`: what the Model Registry holds."""

from __future__ import annotations

import json

import click

from .listing import list_versions
from .store import default_store

__all__ = ["registry"]


@click.group("registry")
def registry() -> None:
    """The MLflow Model Registry: versions, lineage, promotion gates, dossiers, signing keys.

    Embedded store under $FEDSEG_HOME by default; FEDSEG_MLFLOW_TRACKING_URI for a server.
    """


@registry.command("list")
@click.option("--name", default=None, help="Only this registered model.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def list_command(name: str | None, fmt: str) -> None:
    """List registered versions with aliases, metrics and lineage tags."""
    rows = list_versions(default_store(), name)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo("no registered model versions")
        return
    click.echo(f"{'name':24} {'version':>7}  {'aliases':18} dice_pooled  dice_min  rounds")
    for r in rows:
        m = r["metrics"]
        click.echo(
            f"{r['name']:24} {r['version']:>7}  {','.join(r['aliases']) or '-':18} "
            f"{m.get('dice_pooled', float('nan')):11.4f} {m.get('dice_min', float('nan')):9.4f}  "
            f"{r['tags'].get('rounds', '-')}"
        )


def _register_commands() -> None:
    from .cli_attest import attest_command
    from .cli_dossier import comment_command, dossier_command
    from .cli_governance import challenger_command, promote_command, rollback_command, show_command
    from .cli_keys import keygen

    for command in (show_command, promote_command, rollback_command, challenger_command,
                    dossier_command, comment_command, keygen, attest_command):
        registry.add_command(command)


_register_commands()
