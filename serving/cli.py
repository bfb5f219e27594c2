"""`fedseg serve`: run the prediction service for a registered model."""

from __future__ import annotations

import click
from pydantic import ValidationError

from imaging.errors import ImagingError
from registry.errors import RegistryError
from registry.load import LoadedModel, load_model
from registry.store import default_store

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


@click.command("serve")
@click.option("--model", "model_uri", default=None, metavar="URI",
              help="models:/NAME@ALIAS or models:/NAME/VERSION "
                   "[env FEDSEG_SERVE_MODEL_URI, default models:/fedseg-unet@champion]")
@click.option("--host", default=None, help="Interface to listen on [env FEDSEG_SERVE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [env FEDSEG_SERVE_PORT, default 8080].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(model_uri: str | None, host: str | None, port: int | None, log_level: str) -> None:
    """Serve a registered model over HTTP (POST /v1/predict, GET /health/ready).

    The model is loaded from the registry (embedded store under $FEDSEG_HOME, or
    FEDSEG_MLFLOW_TRACKING_URI) before the server starts: a malformed or unknown URI stops here.
    """
    settings = _settings(model_uri=model_uri, host=host, port=port)
    try:
        loaded = load_model(default_store(), settings.model_uri)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None

    import uvicorn

    from imaging.model import load_state_dict

    from .app import create_app

    try:  # fail here, not at readiness, when the weights do not fit the spec
        load_state_dict(loaded.spec, loaded.state_dict)
    except ImagingError as exc:
        raise click.ClickException(f"cannot serve {settings.model_uri}: {exc}") from None

    def preloaded(uri: str) -> LoadedModel:
        return loaded

    click.echo(
        f"serving {loaded.name} version {loaded.version} ({settings.model_uri}) "
        f"on http://{settings.host}:{settings.port}",
        err=True,
    )
    uvicorn.run(create_app(settings, loader=preloaded), host=settings.host, port=settings.port,
                log_level=log_level)
