"""`fedseg coordinator`: the operator's view of journaled runs, and resuming a killed one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

__all__ = ["coordinator", "resume_run_config", "toml_overrides"]


@click.group("coordinator")
def coordinator() -> None:
    """Coordinator runs: list them from the journal, show one, resume a killed one."""


def _open(run_id: str):  # noqa: ANN202
    from .errors import JournalError
    from .journal import RunJournal

    try:
        return RunJournal.open(run_id)
    except JournalError as exc:
        raise click.ClickException(str(exc)) from exc


@coordinator.command("runs")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def runs_command(fmt: str) -> None:
    """Every journaled run, newest first: status, last completed round, final metrics."""
    from .journal import list_runs

    runs = list_runs()
    if fmt == "json":
        click.echo(json.dumps(runs, indent=2, sort_keys=True))
        return
    if not runs:
        click.echo("no coordinator runs journaled yet")
        return
    click.echo(f"{'run_id':34} {'status':12} {'rounds':>8}  {'dice mean':>9} {'worst':>6}  model")
    for r in runs:
        m = r.get("metrics") or {}
        rounds = f"{r.get('last_completed_round', 0)}/{r.get('num_rounds', '?')}"
        click.echo(f"{r['run_id']:34} {r['status']:12} {rounds:>8}  {m.get('dice_mean', float('nan')):9.3f} "
                   f"{m.get('dice_min', float('nan')):6.3f}  {r.get('model_name') or ''}")


@coordinator.command("show")
@click.argument("run_id")
def show_command(run_id: str) -> None:
    """One run's journal as JSON, its run config included."""
    journal = _open(run_id)
    click.echo(json.dumps({**journal.summary(), "run_config": journal.data.get("run_config", {}),
                           "site_ledgers": journal.data.get("site_ledgers", {})}, indent=2, sort_keys=True))


def resume_run_config(run_id: str) -> dict[str, Any]:
    """The journaled run config of a resumable run, with ``resume-run`` set to it."""
    from .errors import JournalError
    from .journal import RunJournal

    journal = RunJournal.open(run_id)
    config = dict(journal.data.get("run_config") or {})
    journal.check_resumable(config)
    if not config:
        raise JournalError(f"run {run_id}'s journal holds no run config")
    return {**config, "resume-run": run_id}


def toml_overrides(config: Mapping[str, Any]) -> str:
    """A flat TOML document of ``config`` (what `flwr run --run-config FILE` reads)."""
    lines = []
    for key, value in sorted(config.items()):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a TOML basic string
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@coordinator.command("resume")
@click.argument("run_id")
@click.option("--app", "app_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="The Flower app folder (pyproject.toml with [tool.flwr.app]).")
@click.option("--superlink", default=None,
              help="SuperLink connection name in $FLWR_HOME/config.toml (flwr run's SUPERLINK).")
@click.option("--stream", is_flag=True, help="Follow the run's logs (flwr run --stream).")
def resume_command(run_id: str, app_dir: Path, superlink: str | None, stream: bool) -> None:
    """Continue RUN_ID after its last completed round, with its journaled run config.

    Launches `flwr run APP SUPERLINK --run-config <journaled config + resume-run>`; the
    ServerApp reopens the journal and the MLflow run. Follow it with `flwr log` and check the
    outcome with `fedseg coordinator runs`.
    """
    from .errors import JournalError

    try:
        config = resume_run_config(run_id)
    except JournalError as exc:
        raise click.ClickException(str(exc)) from exc
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    with tempfile.TemporaryDirectory() as tmp:
        overrides = Path(tmp) / "resume.toml"
        overrides.write_text(toml_overrides(config))
        command = [flwr, "run", str(app_dir), *([superlink] if superlink else []),
                   "--run-config", str(overrides), *(["--stream"] if stream else [])]
        click.echo(f"resuming {run_id}: {' '.join(command[:4])} ...", err=True)
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        code = subprocess.run(command, env=env, check=False).returncode
    if code != 0:
        raise click.ClickException(f"flwr run exited with {code}")
