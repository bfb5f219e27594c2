"""The `fedseg` command: assembles each role's group lazily, so `--help` stays fast."""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of the click group defined in the package it drives
_GROUPS: dict[str, str] = {
    "simulate": "simulation.cli:simulate",
    "coordinator": "server.cli:coordinator",
    "registry": "registry.cli:registry",
    "serve": "serving.cli:serve",
    "site": "client.cli:site",
    "pki": "privacy.cli:pki",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _GROUPS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="fedseg")
def main() -> None:
    """fedseg: train one segmentation model across hospitals without moving their data."""


if __name__ == "__main__":
    main()
