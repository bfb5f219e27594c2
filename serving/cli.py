"""`fedseg serve`: run the prediction service for a registered model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from imaging.errors import ImagingError
from imaging.home import fedseg_home
from registry.errors import RegistryError
from registry.load import LoadedModel, load_model
from registry.store import default_store

from .errors import ApiKeyStoreError, AuthError
from .security.apikeys import ApiKeyStore
from .security.audit import AUDIT_LOGGER
from .settings import ServingSettings

__all__ = ["serve"]


def _settings(**overrides: object) -> ServingSettings:
    try:
        return ServingSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise click.ClickException(f"invalid serving settings: {problems}") from None


@click.group("serve", invoke_without_command=True)
@click.option("--model", "model_uri", default=None, metavar="URI",
              help="models:/NAME@ALIAS or models:/NAME/VERSION "
                   "[env FEDSEG_SERVE_MODEL_URI, default models:/fedseg-unet@champion]")
@click.option("--host", default=None, help="Interface to listen on [env FEDSEG_SERVE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [env FEDSEG_SERVE_PORT, default 8080].")
@click.option("--auth", default=None, metavar="METHODS",
              help="apikey, jwt, apikey,jwt or off (loopback only) [env FEDSEG_SERVE_AUTH, default apikey].")
@click.option("--compile/--no-compile", "compile_forward", default=None,
              help="Compile each model with torch.compile before it serves: faster forwards, "
                   "slower loads [env FEDSEG_SERVE_COMPILE, default on].")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the audit lines (JSON, one per request) to this file [default: stderr].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
def serve(ctx: click.Context, model_uri: str | None, host: str | None, port: int | None,
          auth: str | None, compile_forward: bool | None, audit_log: Path | None,
          log_level: str) -> None:
    """Serve a registered model over HTTP (POST /v1/predict, GET /health/ready).

    The model is loaded from the registry (embedded store under $FEDSEG_HOME, or
    FEDSEG_MLFLOW_TRACKING_URI) before the server starts: a malformed or unknown URI stops here.
    Clients send `Authorization: Bearer <key>`; create keys with `fedseg serve apikey create`.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(model_uri=model_uri, host=host, port=port, auth=auth, compile=compile_forward)
    try:
        loaded = load_model(default_store(), settings.model_uri)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None

    import uvicorn

    from imaging.model import load_state_dict

    from .app import create_app, registry_loader, registry_resolver

    try:  # fail here, not at readiness, when the weights do not fit the spec
        load_state_dict(loaded.spec, loaded.state_dict)
    except ImagingError as exc:
        raise click.ClickException(f"cannot serve {settings.model_uri}: {exc}") from None

    first = [loaded]  # the version checked above serves first; later versions come from the registry

    def preloaded(uri: str) -> LoadedModel:
        if first and uri in (settings.model_uri, f"models:/{loaded.name}/{loaded.version}"):
            return first.pop()
        return registry_loader(uri)

    click.echo(
        f"serving {loaded.name} version {loaded.version} ({settings.model_uri}) "
        f"on http://{settings.host}:{settings.port}",
        err=True,
    )
    if settings.compile:  # the compiled kernels kept beside the registry: a restart takes seconds
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(fedseg_home() / "cache" / "torchinductor"))
        click.echo("compiling the forward (torch.compile) before the first request; "
                   "--no-compile serves the eager network at once", err=True)
    try:
        app = create_app(settings, loader=preloaded, resolver=registry_resolver, freeze_heap=True)
    except AuthError as exc:  # an unreadable JWT key file, a refused algorithm
        raise click.ClickException(str(exc)) from None
    _audit_to(audit_log)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)


def _audit_to(path: Path | None) -> None:
    """Send the ``fedseg.serving.audit`` lines to ``path`` (appended) or stderr."""
    handler = logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit = logging.getLogger(AUDIT_LOGGER)
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False


# ---------------------------------------------------------------------- API keys

_KEY_FILE = click.option(
    "--file", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="FEDSEG_SERVE_APIKEY_FILE",
    help="The key store [env FEDSEG_SERVE_APIKEY_FILE, default $FEDSEG_HOME/serving/apikeys.json].",
)


@serve.group("apikey")
def apikey() -> None:
    """Create, list and revoke API keys (stored as salted hashes; a key is shown only once)."""


@apikey.command("create")
@click.argument("name")
@click.option("--scopes", default="predict", show_default=True,
              help="Comma-separated: predict (/v1/predict, /v1/triage, /v1/jobs), monitor "
                   "(/metrics, /v1/drift, /v2/models), admin (everything).")
@_KEY_FILE
def apikey_create(name: str, scopes: str, key_file: Path | None) -> None:
    """Create a key named NAME and print it (on stdout, once: it is not stored)."""
    try:
        record, key = ApiKeyStore(key_file).create(name, scopes)
    except ApiKeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"API key {record.name!r} ({record.id}, scopes {','.join(record.scopes)}); "
               "store it now, it cannot be shown again:", err=True)
    click.echo(key)


@apikey.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
@_KEY_FILE
def apikey_list(as_json: bool, key_file: Path | None) -> None:
    """List keys (names, scopes, dates; never the keys)."""
    try:
        keys = ApiKeyStore(key_file).list()
    except ApiKeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    for k in keys:
        if as_json:
            click.echo(json.dumps({"id": k.id, "name": k.name, "scopes": list(k.scopes),
                                   "created": k.created, "revoked": k.revoked}))
        else:
            state = f"revoked {k.revoked}" if k.revoked else "active"
            click.echo(f"{k.name:<24} {k.id}  {','.join(k.scopes):<22} created {k.created}  {state}")
    if not keys and not as_json:
        click.echo("no API keys", err=True)


@apikey.command("revoke")
@click.argument("name")
@_KEY_FILE
def apikey_revoke(name: str, key_file: Path | None) -> None:
    """Revoke the active key NAME (or key id); a running service refuses it at once."""
    try:
        record = ApiKeyStore(key_file).revoke(name)
    except ApiKeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {record.name!r} ({record.id})", err=True)
