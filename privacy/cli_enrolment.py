"""`fedseg pki sign-manifest | enrol | sites`: binding a site's name and declared data to its node key."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .enrolment import EnrolledSites, default_enrolment_dir, enrol, sign_manifest, write_enrolment
from .errors import PkiError

__all__ = ["enrol_site", "list_sites", "sign_site_manifest"]

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


@click.command("sign-manifest")
@click.option("--manifest", "manifest_file", required=True, type=_FILE,
              help="The manifest `fedseg site check` wrote ($FEDSEG_HOME/manifests/<site>.json).")
@click.option("--key", "node_key", required=True, type=_FILE,
              help="The node's private key (the one --auth-supernode-private-key loads).")
@click.option("--site", default=None, help="The site's name (default: the manifest's).")
@click.option("--out", "out_file", required=True, type=_FILE, help="Where to write the enrolment document.")
def sign_site_manifest(manifest_file: Path, node_key: Path, site: str | None, out_file: Path) -> None:
    """Sign this site's manifest with its node key: the enrolment to send to the operator (hospital)."""
    try:
        manifest = json.loads(manifest_file.read_text())
        if not isinstance(manifest, dict):
            raise PkiError(f"{manifest_file} is not a manifest (a JSON object)")
        enrolment = sign_manifest(manifest, node_key, site)
    except (OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot read {manifest_file}: {exc}") from None
    except PkiError as exc:
        raise click.ClickException(str(exc)) from None
    write_enrolment(enrolment, out_file)
    click.echo(f"enrolment of {enrolment.site}: {out_file}  (key {enrolment.fingerprint}, "
               f"{enrolment.max_samples} usable slices declared)")
    click.echo("Send it to the operator with the .key.pub the node is registered with.")


@click.command("enrol")
@click.argument("document", type=_FILE)
@click.option("--public-key", "public_key", required=True, type=_FILE,
              help="The site's .key.pub, the one registered with `flwr supernode register`.")
@click.option("--dir", "enrolment_dir", type=_DIR, default=None,
              help="The coordinator's enrolment directory (default: $FEDSEG_ENROLMENT_DIR or "
                   "$FEDSEG_HOME/enrolment).")
@click.option("--force", is_flag=True, help="Replace the site's earlier enrolment (its data changed).")
def enrol_site(document: Path, public_key: Path, enrolment_dir: Path | None, force: bool) -> None:
    """Admit a site's signed enrolment: only with the key registered for its node (operator)."""
    where = enrolment_dir or default_enrolment_dir()
    try:
        enrolment = enrol(document, public_key, where, force=force)
    except PkiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"enrolled {enrolment.site} ({enrolment.fingerprint}, at most {enrolment.max_samples} "
               f"samples per reply) in {where}")


@click.command("sites")
@click.option("--dir", "enrolment_dir", type=_DIR, default=None, help="The enrolment directory.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_sites(enrolment_dir: Path | None, fmt: str) -> None:
    """The enrolled sites, every signature verified: name, node key fingerprint, declared slices."""
    where = enrolment_dir or default_enrolment_dir()
    try:
        enrolled = EnrolledSites.load(where)
    except PkiError as exc:
        raise click.ClickException(str(exc)) from None
    rows = [{"site": e.site, "fingerprint": e.fingerprint, "max_samples": e.max_samples}
            for e in enrolled.values()]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{len(rows)} enrolled site(s) in {where}")
    for row in rows:
        click.echo(f"  {row['site']:24} {row['fingerprint']}  {row['max_samples']} usable slices")
