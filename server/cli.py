"""`fedseg coordinator`: journaled runs and resuming them; the gateway and the operator's tunnel."""

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
    """Coordinator runs (list, show, resume a killed one), its gateway and the operator's tunnel."""


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


def _listener(what: str):  # noqa: ANN202
    def convert(ctx: click.Context, param: click.Parameter, value: str):  # noqa: ANN202
        from .errors import GatewayError
        from .gateway import parse_listener

        try:
            return parse_listener(value, what)
        except GatewayError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


@coordinator.command("gateway")
@click.option("--site-listen", default="0.0.0.0:8000", show_default=True, callback=_listener("--site-listen"),
              help="The sites' address: the Fleet API only.")
@click.option("--operator-listen", default="127.0.0.1:9443", show_default=True,
              callback=_listener("--operator-listen"),
              help="The operators' address (a management interface): the Control API, client certificate required.")
@click.option("--superlink", default="127.0.0.1:9091", show_default=True, callback=_listener("--superlink"),
              help="The SuperLink's loopback address (flower-superlink --host 127.0.0.1 --port ...).")
@click.option("--superlink-name", default="localhost", show_default=True,
              help="A DNS name in the SuperLink's certificate, checked on the loopback hop.")
@click.option("--cert", "certificate", required=True, help="TLS certificate both listeners present.")
@click.option("--key", "certificate_key", required=True, help="Its private key.")
@click.option("--ca", "ca_certificate", required=True, help="The consortium CA (verifies the SuperLink).")
@click.option("--operator-ca", required=True, help="The CA of operators' client certificates.")
@click.option("--allow-operator", "allowed_certs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Only these operator certificates (repeatable; default: any the operator CA signed).")
@click.option("--allow-fingerprint", "allowed_fingerprints", multiple=True,
              help="Like --allow-operator, by SHA-1 fingerprint (lower-case hex).")
@click.option("--runtime-dir", default="/tmp", show_default=True, help="Writable: pid file and request buffers.")
@click.option("--access-log", default="/dev/stdout", show_default=True, help="Request log (operator subject included).")
@click.option("--max-body", default="512m", show_default=True, help="Largest request body (nginx size).")
@click.option("--out", "out", default="-", show_default=True, help="File to write ('-': standard output).")
def gateway_command(site_listen, operator_listen, superlink, superlink_name: str, certificate: str,  # noqa: ANN001
                    certificate_key: str, ca_certificate: str, operator_ca: str, allowed_certs: tuple[Path, ...],
                    allowed_fingerprints: tuple[str, ...], runtime_dir: str, access_log: str, max_body: str,
                    out: str) -> None:
    """Write the gateway's nginx.conf: sites reach only the Fleet API, operators the Control API.

    Run the SuperLink on the loopback address given by --superlink and nginx with
    `nginx -c FILE -e stderr` in the same network namespace; the ServerApp process dials the
    SuperLink's loopback address directly.
    """
    from privacy.errors import PkiError
    from privacy.pki import certificate_sha1

    from .errors import GatewayError
    from .gateway import GatewaySpec, render_nginx_conf

    try:
        fingerprints = [*allowed_fingerprints, *(certificate_sha1(p) for p in allowed_certs)]
        spec = GatewaySpec(
            certificate=certificate, certificate_key=certificate_key, ca_certificate=ca_certificate,
            operator_ca=operator_ca, site_listen=site_listen, operator_listen=operator_listen,
            superlink=superlink, superlink_name=superlink_name,
            operator_fingerprints=tuple(dict.fromkeys(f.lower() for f in fingerprints)),
            runtime_dir=runtime_dir, access_log=access_log, max_body=max_body,
        )
    except (GatewayError, PkiError) as exc:
        raise click.ClickException(str(exc)) from None
    text = render_nginx_conf(spec)
    if out == "-":
        click.echo(text, nl=False)
        return
    Path(out).write_text(text)
    click.echo(f"wrote {out}: sites {spec.site_listen} (Fleet API), operators {spec.operator_listen} "
               f"(Control API, client certificate), SuperLink {spec.superlink}", err=True)


@coordinator.command("tunnel")
@click.option("--gateway", "gateway", required=True, help="HOST:PORT of the gateway's operators' listener.")
@click.option("--ca", "ca_certificate", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The consortium CA (verifies the gateway).")
@click.option("--cert", "certificate", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Your operator certificate (fedseg pki operator-cert).")
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Its private key.")
@click.option("--listen", default="127.0.0.1:9093", show_default=True, callback=_listener("--listen"),
              help="Loopback address for flwr (port 0: any free port).")
@click.option("--server-name", default=None, help="Name to check in the gateway's certificate (default: HOST).")
def tunnel_command(gateway: str, ca_certificate: Path, certificate: Path, key: Path, listen,  # noqa: ANN001
                   server_name: str | None) -> None:
    """Forward flwr's Control API calls to the gateway, presenting your operator certificate.

    The flwr CLI (1.41) cannot present a client certificate; point its connection at this
    tunnel instead: address = "127.0.0.1:9093", insecure = true.
    """
    from .errors import GatewayError
    from .operator_tunnel import TunnelSpec, run_tunnel

    host, sep, port = gateway.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{gateway!r} is not HOST:PORT", param_hint="--gateway")
    try:
        spec = TunnelSpec(host.strip("[]"), int(port), ca_certificate, certificate, key, listen, server_name)
        run_tunnel(spec, ready=lambda message: click.echo(message, err=True))
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from None
