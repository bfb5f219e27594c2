"""`fedseg simulate run`: a federation over site folders on this machine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import SimulationError

__all__ = ["run_command"]


def configure_logging(verbose: bool) -> None:
    """Our progress lines on stderr; Flower's own chatter only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fedseg | %(message)s"))
    logger = logging.getLogger("fedseg")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


@click.command("run")
@click.option("--sites-dir", required=True, type=click.Path(path_type=Path),
              help="Folder whose sub-folders are the hospitals (from `simulate sites` or `import-lgg`).")
@click.option("--run-config", default="", help='Flower run-config overrides, e.g. "num-server-rounds=5 local-epochs=2".')
@click.option("--app-dir", type=click.Path(path_type=Path), default=None,
              help="The Flower app (pyproject.toml with [tool.flwr.app]); default: the fedseg project.")
@click.option("--cpus-per-site", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-site", type=float, default=0.0, show_default=True,
              help="Share of a GPU per virtual site (e.g. 0.5) when one is present.")
@click.option("--misbehave", multiple=True, metavar="SITE=KIND[:FACTOR]",
              help="Make a virtual site misbehave: nan, signflip[:F], scale:F, dropout, straggle[:S], "
                   "impersonate, inflate[:N]. Repeatable.")
@click.option("--resume", "resume", metavar="RUN_ID", default=None,
              help="Continue a killed run after its last completed round, with its journaled run config.")
@click.option("--verbose", is_flag=True, help="Show Flower's and Ray's own logs.")
def run_command(sites_dir: Path, run_config: str, app_dir: Path | None, cpus_per_site: float,
                gpus_per_site: float, misbehave: tuple[str, ...], resume: str | None, verbose: bool) -> None:
    """Run the real ServerApp and ClientApp over SITES-DIR with Flower's simulation engine."""
    from aggregation import AggregationError
    from imaging.errors import ImagingError
    from registry import RegistryError
    from server.cli import resume_run_config
    from server.errors import ServerError

    from .engine import run_simulated_federation

    configure_logging(verbose)
    try:
        if resume:
            if run_config.strip():
                raise click.UsageError("--resume reuses the run's journaled run config; drop --run-config")
            run_config = resume_run_config(resume)  # type: ignore[assignment]
        run_simulated_federation(sites_dir, run_config=run_config, app_dir=app_dir,
                                 cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site,
                                 verbose=verbose, misbehave=misbehave)
    except (SimulationError, ImagingError, ServerError, AggregationError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from exc
    except RuntimeError as exc:
        raise click.ClickException(f"the federation failed: {exc.__cause__ or exc}") from exc
