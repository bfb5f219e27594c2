"""`fedseg registry promote | rollback | challenger | show`: governed moves of ``champion`` and
``challenger``, and lineage.

These are plain :class:`click.Command` objects; ``registry/cli.py`` adds them to its group::

    registry.add_command(promote_command)
    registry.add_command(rollback_command)
    registry.add_command(challenger_command)
    registry.add_command(show_command)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click

from .challenger import ChallengerResult, clear_challenger, read_challenger_history, set_challenger
from .describe import describe_version
from .errors import PromotionRefusedError, RegistryError
from .gates import GateConfig, GateResult, default_gates
from .promotion import PromotionResult, promote, rollback
from .store import default_store

__all__ = ["challenger_command", "promote_command", "rollback_command", "show_command"]


def _echo_gates(results: Iterable[GateResult], forced: bool = False) -> None:
    for r in results:
        verdict = "PASS" if r.passed else ("FAIL (forced)" if forced else "FAIL")
        click.echo(f"  {r.name:16} {verdict:13} {r.detail}")


def _outcome(result: PromotionResult) -> str:
    before = f"v{result.previous}" if result.previous is not None else "none"
    verb = "rolled back" if result.action == "rollback" else "promoted"
    forced = " (forced)" if result.forced else ""
    return (
        f"{verb}{forced}: {result.name} champion is now v{result.version} (was {before}), "
        f"by {result.entry.get('actor')}"
    )


@click.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--gates", "gates_file", type=click.Path(dir_okay=False), default=None,
              help="TOML gates file (default: $FEDSEG_GATES_FILE, else built-in defaults).")
@click.option("--force", is_flag=True, help="Promote even when gates fail (needs --reason).")
@click.option("--reason", default=None, help="Why; required with --force, recorded in the history.")
@click.option("--actor", default=None, help="Who is promoting (default: your login name).")
def promote_command(
    name: str, version: int, gates_file: str | None, force: bool, reason: str | None, actor: str | None
) -> None:
    """Make VERSION of NAME the champion if it passes the promotion gates."""
    try:
        gates = GateConfig.from_toml(gates_file) if gates_file else default_gates()
        result = promote(
            default_store(), name, version, gates=gates, force=force, reason=reason, actor=actor
        )
    except PromotionRefusedError as exc:
        failed = getattr(exc, "failed", ())  # set when gates failed
        if failed:
            click.echo(f"gates for {name} v{version}:")
            _echo_gates(failed)
        raise click.ClickException(str(exc)) from None
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"gates for {name} v{version}:")
    _echo_gates(result.gates, forced=result.forced)
    click.echo(_outcome(result))


@click.command("rollback")
@click.argument("name")
@click.option("--reason", default=None, help="Why, recorded in the history.")
@click.option("--actor", default=None, help="Who is rolling back (default: your login name).")
def rollback_command(name: str, reason: str | None, actor: str | None) -> None:
    """Return NAME's champion alias to the previous champion in its history."""
    try:
        result = rollback(default_store(), name, actor=actor, reason=reason)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_outcome(result))


@click.command("challenger")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--clear", is_flag=True, help="Remove the challenger alias instead of setting it.")
@click.option("--reason", default=None, help="Why, recorded in the challenger history.")
@click.option("--actor", default=None, help="Who is changing it (default: your login name).")
def challenger_command(
    name: str, version: int | None, clear: bool, reason: str | None, actor: str | None
) -> None:
    """Point NAME's challenger alias at VERSION, or remove it with --clear.

    A serving service with a canary share above 0 loads and warms the challenger, then sends
    that share of studies (sticky per study) to it; after --clear it unloads the challenger and
    sends every study to the champion. Both at its next registry check, without a restart
    (POST /v1/admin/reload checks at once). The champion cannot be the challenger.
    """
    if clear == (version is not None):
        raise click.UsageError("give either VERSION (to set the challenger) or --clear, not both")
    store = default_store()
    try:
        if clear:
            result = clear_challenger(store, name, reason=reason, actor=actor)
        else:
            assert version is not None
            result = set_challenger(store, name, version, reason=reason, actor=actor)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_challenger_outcome(result))


def _challenger_outcome(result: ChallengerResult) -> str:
    before = f"v{result.previous}" if result.previous is not None else "none"
    champion = f"v{result.champion}" if result.champion is not None else "none"
    who = result.entry.get("actor")
    if result.action == "clear":
        return (f"challenger cleared: {result.name} has no challenger (was {before}; champion "
                f"{champion}), by {who}; services drop it at their next registry check")
    return (f"challenger set: {result.name} challenger is now v{result.version} (was {before}; "
            f"champion {champion}), by {who}; services with a canary share load it at their "
            "next registry check")


@click.command("show")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def show_command(name: str, version: int, fmt: str) -> None:
    """Show VERSION of NAME: aliases, metrics, lineage, the champion and challenger histories."""
    try:
        store = default_store()
        info = describe_version(store, name, version)
        info["challenger_history"] = read_challenger_history(store, name)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    aliases = ", ".join(info["aliases"]) or "-"
    click.echo(f"{info['name']} v{info['version']}  aliases: {aliases}")
    click.echo(f"run_id: {info['run_id'] or '-'}")
    click.echo("metrics:")
    for key, value in info["metrics"].items():
        click.echo(f"  {key:24} {value:.4f}" if isinstance(value, float) else f"  {key:24} {value}")
    click.echo("lineage:")
    for key, value in info["lineage"].items():
        click.echo(f"  {key:24} {_inline(value)}")
    click.echo("champion history:")
    if not info["champion_history"]:
        click.echo("  (none)")
    for e in info["champion_history"]:
        before = f"v{e['previous']}" if e.get("previous") is not None else "none"
        forced = " FORCED" if e.get("forced") else ""
        why = f": {e['reason']}" if e.get("reason") else ""
        click.echo(f"  {e.get('time')}  {e.get('action')}{forced} v{e.get('version')} (was {before}) "
                   f"by {e.get('actor')}{why}")
    click.echo("challenger history:")
    if not info["challenger_history"]:
        click.echo("  (none)")
    for e in info["challenger_history"]:
        before = f"v{e['previous']}" if e.get("previous") is not None else "none"
        now = f"v{e['version']}" if e.get("version") is not None else "none"
        why = f": {e['reason']}" if e.get("reason") else ""
        click.echo(f"  {e.get('time')}  {e.get('action')} {now} (was {before}) by {e.get('actor')}{why}")


def _inline(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))
