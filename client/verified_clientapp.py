"""One ClientApp task at a site: the site's gate decides on the app package, then Flower runs it.

The site runner (:mod:`client.site_runner`) starts this module once per ClientApp task it
acquired from the SuperNode, as ``python -m client.verified_clientapp ...`` with the task's
token on standard input. The process runs Flower's own ``flwr-clientapp`` code
(:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`: heartbeat, pulling the message,
installing the FAB, loading and calling the ClientApp, the reply, the task's status) with one
step added between pulling the task's input and installing its FAB:

- the site's :class:`~client.app_gate.AppGate` decides on the FAB bytes the SuperNode holds;
- refused: an error reply naming the rule goes to the coordinator (Flower's ``INVALID_FAB``
  code), the task ends failed, and nothing from the package was installed or imported;
- allowed: the site's own fedseg modules are unloaded, so the ClientApp comes from the verified
  FAB as it would under ``flwr-clientapp``, and Flower installs, loads and runs it.

Flower 1.41 has no hook at that point, so for the life of this one-task process the step wraps
the two module-level functions ``run_clientapp`` calls there: ``pull_task_input`` (then the
gate) and ``install_from_fab`` (installs only bytes the gate approved).
:func:`check_flower_seam` refuses to start when Flower's code no longer calls them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from .app_gate import AppGate
from .errors import AppRefused, RunnerError

__all__ = ["SITE_PACKAGES", "check_flower_seam", "log_to_stderr", "main", "run_task", "unload_site_packages"]

log = logging.getLogger("fedseg.client.runner")

#: fedseg's top-level packages (pyproject's import-linter root_packages): a FAB of this project
#: ships its own copies, which must not be shadowed by the site's.
SITE_PACKAGES = frozenset({"aggregation", "client", "fedseg", "imaging", "privacy", "registry", "server",
                           "serving", "simulation"})
_SEAM = ("pull_task_input", "install_from_fab", "push_message")


def log_to_stderr() -> None:
    """The runner's own lines (decisions, launches) on stderr, beside Flower's."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedseg-site-runner %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _flower() -> ModuleType:
    from flwr.supernode.runtime import run_clientapp

    return run_clientapp


def check_flower_seam(flower: ModuleType | None = None) -> None:
    """Refuse a Flower whose ``run_clientapp`` no longer calls what the gate wraps."""
    flower = flower or _flower()
    called = set(flower.run_clientapp.__code__.co_names)
    missing = [name for name in _SEAM[:2] if name not in called]
    missing += [name for name in _SEAM if not callable(getattr(flower, name, None))]
    if missing:
        from flwr.supercore.version import package_version

        raise RunnerError(f"flwr {package_version}: run_clientapp no longer uses {sorted(set(missing))}; "
                          "the site runner cannot check packages before they run with this Flower "
                          "(it is written for flwr 1.41)")


def unload_site_packages() -> None:
    """Forget the site's imported fedseg modules, so an approved FAB's own are imported."""
    for name in [m for m in sys.modules if m.split(".", 1)[0] in SITE_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()


@contextmanager
def _wrapped(module: ModuleType, name: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def _round(message: Any) -> int:
    try:
        return int(message.content["config"].get("server-round", 0))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


def run_task(token: str, gate: AppGate, *, runtime_api_address: str, insecure: bool,
             certificates: bytes | None, parent_pid: int | None, flower: ModuleType | None = None) -> None:
    """Run one ClientApp task through Flower, the gate deciding before the FAB is installed.

    Ends the process (Flower's ``flwr_exit``), as ``flwr-clientapp`` does. ``flower`` is
    :mod:`flwr.supernode.runtime.run_clientapp` (a test's stand-in otherwise).
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    flower = flower or _flower()
    check_flower_seam(flower)
    pull, install, push = flower.pull_task_input, flower.install_from_fab, flower.push_message
    approved: set[str] = set()

    def pull_and_decide(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        named = run.fab_hash if fab.hash_str.lower() == run.fab_hash.lower() else (
            f"{run.fab_hash} (the SuperNode's FAB says {fab.hash_str})")
        decision = gate.decide(fab.content, fab_hash=named, run_id=run.run_id,
                               server_round=_round(message), kind=message.metadata.message_type)
        if not decision.allowed:
            log.warning("run %s: app package refused (rule %s): %s", run.run_id, decision.rule,
                        decision.detail)
            push(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=decision.public_reason),
                                 reply_to=message), context)
            raise AppRefused(decision.public_reason, rule=decision.rule)
        log.info("run %s: app package allowed by %s", run.run_id, decision.detail)
        approved.add(decision.identity.fab_sha256)
        unload_site_packages()
        return message, context, run, fab

    def install_approved(fab_file: bytes | Path, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        if hashlib.sha256(content).hexdigest() not in approved:
            raise AppRefused("the site runner installs only an app package its gate approved", rule="apps")
        return install(fab_file, *args, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(_wrapped(flower, "pull_task_input", pull_and_decide))
        stack.enter_context(_wrapped(flower, "install_from_fab", install_approved))
        flower.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=insecure,
                             certificates=certificates, parent_pid=parent_pid,
                             runtime_dependency_install=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client.verified_clientapp",
        description="One ClientApp task, checked by the site's policy first (token on stdin). "
                    "Started by `fedseg site runner`.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--policy", required=True, type=Path)
    parser.add_argument("--audit-file", required=True, type=Path)
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true")
    tls.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log_to_stderr()
    token = sys.stdin.readline().strip()
    if not token:
        sys.exit("client.verified_clientapp: no task token on standard input")
    certificates = Path(args.root_certificates).expanduser().read_bytes() if args.root_certificates else None
    try:
        run_task(token, AppGate(args.policy, args.audit_file), runtime_api_address=args.runtime_api_address,
                 insecure=args.insecure, certificates=certificates, parent_pid=args.parent_pid)
    except RunnerError as exc:
        sys.exit(f"client.verified_clientapp: {exc}")


if __name__ == "__main__":
    main()
