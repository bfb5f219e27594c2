"""The coordinator's Flower ServerApp (Message API)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from registry import default_store

from .config import FederationConfig
from .federation import run_federation

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, config, default_store())
