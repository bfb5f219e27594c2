"""`fedseg registry attest`: sign the evidence of a version published before evidence existed.

Registered on the ``registry`` group by registry/cli.py.
"""

from __future__ import annotations

import click

from .errors import RegistryError
from .evidence import attest_version
from .promotion import _login
from .signing import load_signing_key
from .store import default_store

__all__ = ["attest_command"]


@click.command("attest")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--reason", required=True, help="What you reviewed; signed into the evidence.")
@click.option("--actor", default=None, help="Who attests (default: your login name).")
def attest_command(name: str, version: int, reason: str, actor: str | None) -> None:
    """Sign the evidence of VERSION of NAME, signed in the old format (model files only).

    Review its lineage and metric tags first (`fedseg registry show NAME VERSION`): they are
    signed as they are now. Run where the consortium signing key is (FEDSEG_SIGNING_KEY); it
    must be the key that signed the model. A version that already has evidence is refused.
    """
    try:
        evidence = attest_version(default_store(), name, version, load_signing_key(),
                                  reason=reason, actor=actor or _login())
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"attested: {name} v{version}: {len(evidence.tags)} tags, {len(evidence.model_files)} "
               f"model files and {len(evidence.dossier_files)} dossier files signed by key "
               f"{evidence.key_fingerprint[:16]}")
