"""The site runner: the site-installed process that executes a SuperNode's ClientApp tasks.

A SuperNode started with ``--isolation process`` runs no ClientApp itself: it queues one task
per message and serves them on its runtime API (default ``127.0.0.1:9094``), where an outside
process acquires each task (``AcquireTask``, which hands out the task's token). In place of
Flower's ``flower-superexec``, the runner acquires only ClientApp tasks and starts
:mod:`client.verified_clientapp` for each: the site's gate decides on the task's FAB before
anything from it is installed or imported, then Flower's own ClientApp code runs it.

The decision is the site's: the runner, the gate and the policy code come from the fedseg
installed at the site, never from the package under review.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .app_gate import require_app_rules
from .audit import AuditLog
from .errors import PolicyError, PolicyViolation, RunnerError
from .policy import load_policy
from .verified_clientapp import check_flower_seam

__all__ = ["DEFAULT_RUNTIME_API_ADDRESS", "RunnerSettings", "SiteRunner"]

log = logging.getLogger("fedseg.client.runner")

#: Where ``flower-supernode`` serves its runtime API unless told otherwise (``--port``).
DEFAULT_RUNTIME_API_ADDRESS = "127.0.0.1:9094"


@dataclass(frozen=True)
class RunnerSettings:
    """What the runner checks against and how it reaches the SuperNode's runtime API.

    ``root_certificates`` is the CA of a runtime API served with TLS; ``insecure`` a plain HTTP
    one (the SuperNode's default, on its loopback address). ``superexec_auth_secret_file`` is the
    secret the SuperNode was started with: it then hands tasks to no process without it.
    """

    policy_file: Path
    audit_file: Path
    runtime_api_address: str = DEFAULT_RUNTIME_API_ADDRESS
    insecure: bool = False
    root_certificates: Path | None = None
    superexec_auth_secret_file: Path | None = None
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.insecure == (self.root_certificates is not None):
            raise RunnerError("give exactly one of --insecure (a plain-HTTP runtime API) and "
                              "--root-certificates (the CA of a TLS one)")

    def task_command(self) -> list[str]:
        """The command that runs one task (its token goes to standard input)."""
        tls = ["--insecure"] if self.insecure else ["--root-certificates", str(self.root_certificates)]
        return [sys.executable, "-m", "client.verified_clientapp",
                "--runtime-api-address", self.runtime_api_address,
                "--policy", str(self.policy_file), "--audit-file", str(self.audit_file),
                *tls, "--parent-pid", str(os.getpid())]


@dataclass
class SiteRunner:
    """Acquires the SuperNode's ClientApp tasks and starts a verified ClientApp for each."""

    settings: RunnerSettings
    _tasks: list[subprocess.Popen] = field(default_factory=list)
    _checked: bool = False

    def check(self) -> None:
        """Refuse to start on a policy that cannot decide, or a Flower the gate cannot wrap."""
        policy_file = self.settings.policy_file
        if not policy_file.is_file():
            raise RunnerError(f"no site policy at {policy_file}")
        try:
            policy = load_policy(policy_file)
            require_app_rules(policy)
        except (PolicyError, PolicyViolation) as exc:
            raise RunnerError(str(exc)) from exc
        check_flower_seam()
        from flwr.supercore.version import package_version

        AuditLog(self.settings.audit_file).append(
            "runner-start", policy_file=str(policy_file),
            policy_sha256=hashlib.sha256(policy_file.read_bytes()).hexdigest(),
            runtime_api_address=self.settings.runtime_api_address, flwr_version=package_version)
        self._checked = True

    def _client(self):  # noqa: ANN202 - flwr's RuntimeHttpClient
        from flwr.supercore.auth import load_superexec_auth_secret
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        settings = self.settings
        interceptors = [RuntimeVersionHttpInterceptor(component_name="fedseg-site-runner")]
        if settings.superexec_auth_secret_file is not None:
            try:
                secret = load_superexec_auth_secret(str(settings.superexec_auth_secret_file))
            except ValueError as exc:
                raise RunnerError(str(exc)) from exc
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
        return RuntimeHttpClient.from_server_address(
            server_address=settings.runtime_api_address, insecure=settings.insecure,
            root_certificates=settings.root_certificates.read_bytes() if settings.root_certificates else None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
        )

    def launch(self, token: str, task_id: int, run_id: int) -> subprocess.Popen:
        """Start the verified ClientApp for one acquired task."""
        process = subprocess.Popen(self.settings.task_command(), stdin=subprocess.PIPE)  # noqa: S603
        assert process.stdin is not None
        try:
            process.stdin.write(token.encode() + b"\n")
            process.stdin.close()
        except BrokenPipeError:  # it died at start; the SuperNode expires the task
            log.error("task %d of run %d: the verified ClientApp exited before reading its token", task_id, run_id)
        log.info("task %d of run %d: verified ClientApp started (pid %d)", task_id, run_id, process.pid)
        self._tasks.append(process)
        return process

    def serve_forever(self) -> None:
        """Acquire and launch ClientApp tasks until stopped (SIGTERM or Ctrl-C)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        if not self._checked:
            self.check()
        client = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        log.info("site runner: ClientApp tasks of %s, checked against %s",
                 self.settings.runtime_api_address, self.settings.policy_file)
        try:
            while True:
                self._tasks = [p for p in self._tasks if p.poll() is None]
                acquired = client.AcquireTask(request)
                if acquired.HasField("task") and acquired.token:
                    self.launch(acquired.token, acquired.task.task_id, acquired.task.run_id)
                    continue
                time.sleep(self.settings.poll_interval_s)
        finally:
            client.close()
