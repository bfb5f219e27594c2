"""`fedseg registry dossier` and `fedseg registry comment`: a version's governance dossier and
the data scientists' comments on it. Registered on the ``registry`` group by registry/cli.py."""

from __future__ import annotations

from pathlib import Path

import click

from .comments import MAX_COMMENT_CHARS, add_comment
from .dossier import log_signed_facts, write_facts
from .dossier_facts import collect_facts, get_version
from .errors import RegistryError
from .signing import load_signing_key
from .store import default_store

__all__ = ["dossier_command", "comment_command"]


@click.command("dossier")
@click.argument("name")
@click.argument("version")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Folder for dossier.md, dossier.html and plots/ (created if missing).",
)
@click.option(
    "--log/--no-log", default=True, show_default=True,
    help="Also log the dossier as artifacts of the version's training run (dossier/v<N>/) and "
         "sign it into the version's evidence (needs the consortium signing key).",
)
def dossier_command(name: str, version: str, out_dir: Path, log: bool) -> None:
    """Write the governance dossier of NAME VERSION (a number or an alias such as champion).

    The version's signed evidence is verified first: an edited lineage or metric tag, a
    re-registered artifact or an edited logged dossier is refused, naming what differs.
    """
    store = default_store()
    try:
        facts = collect_facts(store, name, version)
        for path in write_facts(facts, out_dir):
            click.echo(str(path))
        if log:
            logged = log_signed_facts(store, facts, load_signing_key())
            click.echo(f"logged to run {facts.run_id}: {logged}/ (evidence signed again over it)")
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("comment")
@click.argument("name")
@click.argument("version")
@click.option("--author", required=True, help="Who writes the comment.")
@click.option("--text", required=True, help=f"The comment (1 to {MAX_COMMENT_CHARS} characters).")
def comment_command(name: str, version: str, author: str, text: str) -> None:
    """Add a comment to NAME VERSION; it appears in the version's dossier."""
    store = default_store()
    try:
        number = int(get_version(store.client(), name, version).version)
        comment = add_comment(store, name, number, author, text)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"comment {comment.number} on {name} v{number} by {comment.author} at {comment.time}")
