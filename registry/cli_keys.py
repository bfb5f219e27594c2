"""`fedseg registry keygen`: a consortium signing key pair for production."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .errors import SigningKeyError
from .signing import (
    SIGNING_KEY_ENV,
    SIGNING_KEY_PASSPHRASE_ENV,
    TRUSTED_KEYS_ENV,
    generate_keypair,
    load_trusted_keys,
)

__all__ = ["keygen"]


@click.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the key pair (created 0700 if absent).")
@click.option("--name", default="consortium", show_default=True,
              help="File name stem: NAME-signing-key.pem and NAME.pub.pem.")
@click.option("--encrypt/--no-encrypt", default=False, show_default=True,
              help=f"Encrypt the private key with the passphrase in ${SIGNING_KEY_PASSPHRASE_ENV}.")
def keygen(out_dir: Path, name: str, encrypt: bool) -> None:
    """Create an Ed25519 key pair that signs every published model.

    The private key (mode 0600) belongs on the coordinator only; the public key goes to every
    service that loads models. Existing key files are never overwritten.
    """
    passphrase = None
    if encrypt:
        raw = os.environ.get(SIGNING_KEY_PASSPHRASE_ENV)
        if not raw:
            raise click.ClickException(f"--encrypt needs the passphrase in ${SIGNING_KEY_PASSPHRASE_ENV}")
        passphrase = raw.encode()
    try:
        private_path, public_path = generate_keypair(out_dir, name=name, passphrase=passphrase)
        (fingerprint,) = load_trusted_keys(str(public_path))  # the one key's fingerprint
    except SigningKeyError as exc:
        raise click.ClickException(str(exc)) from None
    private_path, public_path = private_path.resolve(), public_path.resolve()
    click.echo(f"fingerprint  {fingerprint[:16]}  (sha256 {fingerprint})")
    click.echo(f"private key  {private_path}  (0600{', encrypted' if encrypt else ''})")
    click.echo(f"public key   {public_path}")
    click.echo("")
    click.echo("Coordinator (signs what it publishes), keep the private key there only:")
    click.echo(f"  export {SIGNING_KEY_ENV}={private_path}")
    if encrypt:
        click.echo(f"  export {SIGNING_KEY_PASSPHRASE_ENV}=...   # from your secret store")
    click.echo("Services that load models (fedseg serve), copy the public key into a directory:")
    click.echo(f"  export {TRUSTED_KEYS_ENV}=/etc/fedseg/trusted-keys   # holding {public_path.name}")
    click.echo(f"  (or {TRUSTED_KEYS_ENV}={public_path}; a comma-separated list of .pem files also works)")

