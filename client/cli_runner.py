"""`fedseg site runner`: run the node's ClientApp tasks, each app package checked by the site first."""

from __future__ import annotations

from pathlib import Path

import click

from .site_runner import DEFAULT_RUNTIME_API_ADDRESS, RunnerSettings, SiteRunner
from .verified_clientapp import log_to_stderr

__all__ = ["runner"]


@click.command("runner")
@click.option("--site-config", "site_config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The node's site.toml: its policy and audit log (the SuperNode's site-config).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The site policy (its [apps] rules decide). Default: the site config's.")
@click.option("--audit-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The site's audit log. Default: the site config's.")
@click.option("--runtime-api-address", default=DEFAULT_RUNTIME_API_ADDRESS, show_default=True,
              help="The SuperNode's runtime API (flower-supernode --isolation process --port).")
@click.option("--insecure", is_flag=True, help="The runtime API is plain HTTP (the SuperNode's default).")
@click.option("--root-certificates", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="The CA of a runtime API served with TLS (--ssl-certfile).")
@click.option("--superexec-auth-secret-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="The secret the SuperNode was given (--superexec-auth-secret-file): "
                                 "with it, only this runner can take the node's tasks.")
def runner(site_config: Path | None, policy_file: Path | None, audit_file: Path | None,
           runtime_api_address: str, insecure: bool, root_certificates: Path | None,
           superexec_auth_secret_file: Path | None) -> None:
    """Run the SuperNode's ClientApp tasks: each app package is checked against the site's
    policy.toml [apps] before any of its code runs; a refused one gets an error reply naming
    the rule, a `refusal` line in the audit log, and reads no data.

    Start the SuperNode with `--isolation process` and this beside it, in place of
    `flower-superexec`.
    """
    from .errors import ClientError, RunnerError
    from imaging.errors import ImagingError

    log_to_stderr()
    try:
        if site_config is not None:
            from .site_config import load_site_config

            site = load_site_config(site_config)
            policy_file, audit_file = policy_file or site.policy_path, audit_file or site.audit_path
        if policy_file is None or audit_file is None:
            raise click.UsageError("give --site-config, or --policy and --audit-file")
        settings = RunnerSettings(policy_file=policy_file, audit_file=audit_file,
                                  runtime_api_address=runtime_api_address, insecure=insecure,
                                  root_certificates=root_certificates,
                                  superexec_auth_secret_file=superexec_auth_secret_file)
        site_runner = SiteRunner(settings)
        site_runner.check()
    except (ClientError, ImagingError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"fedseg site runner: ClientApp tasks of {runtime_api_address}, app packages checked "
               f"against {policy_file} ([apps]), decisions in {audit_file}")
    site_runner.serve_forever()
