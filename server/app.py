"""The coordinator's Flower ServerApp (Message API)."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from registry import default_store

from .config import FederationConfig
from .federation import run_federation

__all__ = ["app"]

app = ServerApp()


def _log_to_stdout() -> None:
    """Send fedseg's INFO lines to stdout, which Flower mirrors to `flwr log` and `flwr run --stream`.

    The flwr-serverapp process configures only Flower's own logger; without this the coordinator's
    round lines (sites, Dice, rejections, publication) would reach nobody. A host that already
    configured logging (the simulation, tests) keeps its handlers.
    """
    logger = logging.getLogger("fedseg")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s fedseg: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stdout()
    config = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, config, default_store())
