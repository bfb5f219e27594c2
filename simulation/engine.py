"""Running the real ServerApp and ClientApp over site folders with Flower's simulation engine.

Each virtual SuperNode reads only its own site folder, through the code a hospital node runs
(`client.app.create_client_app` with a partition-to-folder resolver). The run config is the
Flower app's ``[tool.flwr.app.config]`` fused with the overrides, as `flwr run` would do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.config import fuse_dicts, get_fused_config_from_dir, get_project_config, parse_config_args
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from client.app import create_client_app
from client.site import PartitionSites
from server.app import app as server_app

from .errors import AppConfigError, SitesDirError
from .enrolment import simulated_enrolment
from .misbehave import misbehave_mod, parse_misbehavior

__all__ = ["discover_sites", "default_app_dir", "fused_run_config", "run_simulated_federation"]


def discover_sites(sites_dir: Path) -> list[Path]:
    """Every non-hidden sub-folder of ``sites_dir`` is one hospital, in name order."""
    sites_dir = Path(sites_dir)
    if not sites_dir.is_dir():
        raise SitesDirError(f"sites folder {sites_dir} does not exist")
    sites = sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise SitesDirError(
            f"{sites_dir} holds no site folders; create some with `fedseg simulate sites --out {sites_dir}`"
        )
    return sites


def default_app_dir() -> Path:
    """The Flower app: the fedseg project folder holding ``[tool.flwr.app]``."""
    return Path(__file__).resolve().parent.parent


def fused_run_config(app_dir: Path, overrides: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The app's run config with ``overrides`` ("key=value ..." or a mapping) applied."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise AppConfigError(f"no Flower app at {app_dir} (pyproject.toml missing); pass --app-dir")
    try:
        get_project_config(app_dir)["tool"]["flwr"]["app"]["config"]
    except (KeyError, TypeError) as exc:
        raise AppConfigError(f"{pyproject} has no [tool.flwr.app.config] section") from exc
    if isinstance(overrides, str):
        try:
            overrides = parse_config_args([overrides]) if overrides.strip() else {}
        except Exception as exc:  # flwr raises ValueError or tomllib errors
            raise AppConfigError(f"cannot parse run config {overrides!r}: {exc}") from exc
    base = get_fused_config_from_dir(Path(app_dir), {})
    try:
        return dict(fuse_dicts(base, dict(overrides or {})))
    except ValueError as exc:
        unknown = sorted(set(overrides or {}) - set(base))
        raise AppConfigError(
            f"unknown run config key(s) {unknown}; known keys: {', '.join(sorted(base))}"
        ) from exc


def run_simulated_federation(
    sites_dir: Path,
    *,
    run_config: str | Mapping[str, Any] | None = None,
    app_dir: Path | None = None,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
    verbose: bool = False,
    misbehave: Sequence[str] = (),
) -> None:
    """One federation, one virtual SuperNode per site folder, through Ray.

    ``misbehave``: ``SITE=KIND[:FACTOR]`` entries (see :mod:`simulation.misbehave`).
    """
    sites = discover_sites(sites_dir)
    plan = parse_misbehavior(misbehave, [p.name for p in sites])
    mods = [misbehave_mod(plan, sites)] if plan else None
    config = fused_run_config(app_dir or default_app_dir(), run_config)
    if int(config.get("min-sites", 1)) > len(sites):
        raise SitesDirError(
            f"min-sites={config['min-sites']} but {sites_dir} holds {len(sites)} site(s)"
        )
    # Hospitals are offline: never let Flower install app dependencies at run time.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's own future default
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with simulated_enrolment(sites) as node_keys:
        # `_run_simulation` is what Flower's own simulation process calls; pinned flwr==1.41.0.
        _run_simulation(
            num_supernodes=len(sites),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=create_client_app(PartitionSites(tuple(sites), tuple(node_keys)), train_mods=mods),
            server_app=server_app,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
                "init_args": {"include_dashboard": False},
            },
            server_app_context=context,
            verbose_logging=verbose,
        )
