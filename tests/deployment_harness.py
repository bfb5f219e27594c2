"""Real Flower processes on loopback ports: a TLS SuperLink with SuperNode authentication, hospital
SuperNodes with their own keys and site configs, and the operator's ``flwr`` CLI.

Everything is made the way the README's runbooks make it: keys and certificates with
``fedseg pki`` (its click group, in-process), site keys registered by running the
``flwr supernode register`` lines that ``fedseg pki register-steps`` prints, the app launched
with ``flwr run <app> <connection>`` and followed with ``flwr list``. Each process gets its own
``FLWR_HOME`` and ``FEDSEG_HOME``; the SuperLink's ``FEDSEG_HOME`` is inherited by the
``flower-superexec`` and ``flwr-serverapp`` processes it starts, so that is where the coordinator's
registry lives. Run-time dependency installation is off everywhere.

Usage (see tests/test_deployment.py)::

    with Deployment.start(tmp_dir) as dep:
        dep.add_site("hospital-a", site_toml)          # key, registration, SuperNode
        run = dep.run_app("num-server-rounds=2 ...")   # blocks until the run ends
        dep.run_status(run.run_id)["status"]           # "finished:completed"
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner

from privacy.cli import pki
from server.cli import coordinator

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedseg"
# Readiness waits (not assertions): generous, a loaded 2-core CI machine is slow to import torch.
_START_TIMEOUT_S = 120.0
# What a SuperNode prints once the SuperLink has activated it (flwr 1.41).
ACTIVATED = re.compile(r"SuperNode ID: \d+")
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"

__all__ = ["ACTIVATED", "BackgroundRun", "CLIENTAPP_STARTED", "CONNECTION", "Deployment", "FlowerRun", "Gateway",
           "Process", "coordinator_cli", "flwr_config", "free_port", "pki_cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pki_cli(*args: str) -> str:
    """``fedseg pki ARGS`` in-process; its output, or an AssertionError naming the failure."""
    result = CliRunner().invoke(pki, list(args))
    assert result.exit_code == 0, f"fedseg pki {' '.join(args)} failed:\n{result.output}"
    return result.output


def coordinator_cli(*args: str) -> str:
    """``fedseg coordinator ARGS`` in-process; its output, or an AssertionError."""
    result = CliRunner().invoke(coordinator, list(args))
    assert result.exit_code == 0, f"fedseg coordinator {' '.join(args)} failed:\n{result.output}"
    return result.output


def flwr_config(address: str, *, root_certificates: Path | None) -> str:
    """A ``$FLWR_HOME/config.toml`` with one default connection, as the README writes it."""
    tls = (f'root-certificates = "{root_certificates}"\n' if root_certificates is not None
           else "insecure = true\n")
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}')


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDSEG_", "MLFLOW_", "FLWR_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # flower-superexec, flwr-*app from this venv
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
        TERM="dumb",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, start time) of every process (Linux /proc)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """Every living descendant of PID with its start time (to never signal a reused pid)."""
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, (ppid, started) in table.items():
            if ppid == current and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def _kill_if_same(pid: int, started: str) -> None:
    """SIGKILL PID only if it is still the process we saw start (same start time)."""
    if _proc_table().get(pid, (0, ""))[1] != started:
        return
    with _quiet():
        os.kill(pid, signal.SIGKILL)


@dataclass
class Process:
    """One started process with its log file; ``stop`` ends it and everything it started."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    spawned: dict[int, str] = field(default_factory=dict)  # descendants: pid -> start time

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = _START_TIMEOUT_S,
                 *, since: int = 0) -> bool:
        """Wait until the log (from character SINCE on) matches PATTERN (True) or the process
        exits (False)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_children()
            if regex.search(self.log()[since:]):
                return True
            if not self.alive:
                return bool(regex.search(self.log()[since:]))
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {regex.pattern!r} within {timeout:.0f} s; log:\n{self.log()[-3000:]}")

    def remember_children(self) -> None:
        """Note the processes this one started (superexec, app processes), to end them later."""
        if self.alive:
            self.spawned.update(_descendants(self.popen.pid))

    def kill_node(self) -> None:
        """SIGKILL the process and everything it started, at once: a crashed machine."""
        self.remember_children()
        self.popen.kill()
        for pid, started in self.spawned.items():
            _kill_if_same(pid, started)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s) this process, then whatever it started that is left."""
        self.remember_children()
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        for pid, started in self.spawned.items():
            _kill_if_same(pid, started)


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class FlowerRun:
    run_id: int
    output: str  # what `flwr run --stream` printed: the ServerApp's log
    returncode: int


class BackgroundRun:
    """``Deployment.run_app`` in a thread, so that a slow scenario overlaps other tests."""

    def __init__(self, dep: Deployment, run_config: str, *,
                 while_running: Callable[[int], None] | None = None) -> None:
        self._result: FlowerRun | None = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._result = dep.run_app(run_config, while_running=while_running)
            except BaseException as exc:  # re-raised in the test that joins it
                self._error = exc

        self._thread = threading.Thread(target=target, name="flwr-run", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def result(self, timeout: float = 900) -> FlowerRun:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the background run did not end within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


@dataclass(frozen=True)
class Gateway:
    """The coordinator's gateway (nginx from ``fedseg coordinator gateway``) and the operator's
    tunnel (``fedseg coordinator tunnel``) in front of a loopback-bound SuperLink."""

    nginx: Process
    tunnel: Process
    site_port: int  # what hospitals dial: the Fleet API only
    operator_port: int  # the operators' listener: Control API, operator certificate required
    tunnel_port: int  # the operator's flwr connection
    operator_ca: Path
    operator_cert: Path
    operator_key: Path


@dataclass
class Deployment:
    """A SuperLink with TLS, ``--enable-supernode-auth`` and a ``--database``, plus SuperNodes.

    With ``gateway`` the deployment is the README's: the SuperLink listens on its own loopback
    port (``superlink_port``), SuperNodes dial the gateway's sites' listener (``port``), and the
    operator's ``flwr`` reaches the Control API through the tunnel with an operator certificate.
    """

    root: Path
    port: int  # the address SuperNodes dial
    ca_cert: Path
    keys_dir: Path
    server_home: Path
    operator_env: dict[str, str]
    superlink: Process
    superlink_port: int
    gateway: Gateway | None = None
    supernodes: dict[str, Process] = field(default_factory=dict)
    _all: list[Process] = field(default_factory=list)

    # ------------------------------------------------------------------ start and stop

    @classmethod
    def start(cls, root: Path, *, consortium: str = "fedseg-test", gateway: bool = False) -> Deployment:
        """PKI with ``fedseg pki``, then the SuperLink (and with GATEWAY its nginx gateway and the
        operator's tunnel); returns once it accepts connections."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        pki_dir, tls_dir, keys_dir = root / "pki" / "ca", root / "pki" / "superlink", root / "pki" / "sites"
        pki_cli("init-ca", "--out", str(pki_dir), "--consortium", consortium)
        pki_cli("superlink-cert", "--ca", str(pki_dir), "--host", "localhost", "--ip", "127.0.0.1",
                "--out", str(tls_dir))
        port = free_port()
        server_home = root / "coordinator-home"
        env = _base_env(FEDSEG_HOME=str(server_home), FLWR_HOME=str(root / "flwr-superlink"))
        superlink = _spawn(
            "superlink",
            [str(BIN / "flower-superlink"),
             "--ssl-ca-certfile", str(tls_dir / "ca.crt"),
             "--ssl-certfile", str(tls_dir / "superlink.crt"),
             "--ssl-keyfile", str(tls_dir / "superlink.key"),
             "--enable-supernode-auth",
             "--database", str(root / "superlink.db"),
             "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            env, root,
        )
        operator_home = root / "flwr-operator"
        operator_home.mkdir()
        dep = cls(root, port, pki_dir / "ca.crt", keys_dir, server_home,
                  _base_env(FLWR_HOME=str(operator_home)), superlink, port, _all=[superlink])
        try:
            _wait_listening(superlink, port)
            if gateway:
                dep.gateway = dep._start_gateway(tls_dir, consortium)
                dep.port = dep.gateway.site_port
            # The operator's connection, exactly as the README tells operators to write it.
            (operator_home / "config.toml").write_text(
                flwr_config(f"127.0.0.1:{dep.gateway.tunnel_port}", root_certificates=None) if dep.gateway
                else flwr_config(f"127.0.0.1:{port}", root_certificates=pki_dir / "ca.crt"))
        except BaseException:
            dep.stop()
            raise
        return dep

    def _start_gateway(self, tls_dir: Path, consortium: str) -> Gateway:
        """``fedseg coordinator gateway`` -> nginx, then ``fedseg coordinator tunnel`` (a process)."""
        operator_ca, operators = self.root / "pki" / "operator-ca", self.root / "pki" / "operators"
        pki_cli("init-ca", "--out", str(operator_ca), "--consortium", f"{consortium}-operators")
        pki_cli("operator-cert", "--ca", str(operator_ca), "--name", "operator", "--out", str(operators))
        site_port, operator_port, tunnel_port = free_port(), free_port(), free_port()
        run_dir = self.root / "gateway"
        run_dir.mkdir()
        coordinator_cli(
            "gateway", "--site-listen", f"127.0.0.1:{site_port}", "--operator-listen", f"127.0.0.1:{operator_port}",
            "--superlink", f"127.0.0.1:{self.superlink_port}", "--cert", str(tls_dir / "superlink.crt"),
            "--key", str(tls_dir / "superlink.key"), "--ca", str(tls_dir / "ca.crt"),
            "--operator-ca", str(operator_ca / "ca.crt"), "--runtime-dir", str(run_dir),
            "--access-log", str(run_dir / "access.log"), "--out", str(run_dir / "nginx.conf"))
        nginx = _spawn("gateway", [nginx_binary(), "-c", str(run_dir / "nginx.conf"), "-e", "stderr"],
                       _base_env(), run_dir)
        self._all.append(nginx)
        _wait_listening(nginx, site_port)
        tunnel = _spawn(
            "operator-tunnel",
            [sys.executable, "-m", "fedseg", "coordinator", "tunnel", "--gateway", f"127.0.0.1:{operator_port}",
             "--ca", str(tls_dir / "ca.crt"), "--cert", str(operators / "operator.crt"),
             "--key", str(operators / "operator.key"), "--listen", f"127.0.0.1:{tunnel_port}"],
            _base_env(PYTHONPATH=str(ROOT)), self.root / "operator",
        )
        self._all.append(tunnel)
        if not tunnel.wait_for("fedseg tunnel: listening on"):
            raise RuntimeError(f"the operator tunnel exited:\n{tunnel.log()[-3000:]}")
        return Gateway(nginx, tunnel, site_port, operator_port, tunnel_port, operator_ca / "ca.crt",
                       operators / "operator.crt", operators / "operator.key")

    def stop(self) -> None:
        for process in reversed(self._all):
            process.stop()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the operator's CLI

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              env=self.operator_env, cwd=self.root, timeout=timeout)

    def site_key(self, site: str) -> tuple[Path, Path]:
        """``fedseg pki site-key``: the site's private key and its ``.pub`` file."""
        pki_cli("site-key", "--site", site, "--out", str(self.keys_dir))
        return self.keys_dir / f"{site}.key", self.keys_dir / f"{site}.key.pub"

    def register(self, *public_keys: Path) -> list[int]:
        """Run the registration commands ``fedseg pki register-steps`` prints; the node ids."""
        steps = pki_cli("register-steps", *map(str, public_keys), "--connection", CONNECTION,
                        "--address", f"127.0.0.1:{self.port}", "--root-certificates", str(self.ca_cert))
        node_ids = []
        for line in steps.splitlines():
            if not line.startswith("flwr "):
                continue
            argv = shlex.split(line)
            done = self.flwr(*argv[1:], "--format", "json")
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            node_ids.append(int(json.loads(done.stdout)["node-id"]))
        assert len(node_ids) == len(public_keys), steps
        return node_ids

    # ------------------------------------------------------------------ hospitals

    def start_supernode(self, name: str, private_key: Path, node_config: str, *,
                        root_certificates: Path | None = None, env: Mapping[str, str] | None = None,
                        extra_args: tuple[str, ...] = (), runtime_port: int | None = None) -> Process:
        """A ``flower-supernode`` dialing the SuperLink with TLS (CA: ``root_certificates``),
        its runtime API on ``runtime_port`` (default: a free port)."""
        home = self.site_home(name)
        process = _spawn(
            f"supernode-{name}",
            [str(BIN / "flower-supernode"),
             "--superlink", f"127.0.0.1:{self.port}",
             "--root-certificates", str(root_certificates or self.ca_cert),
             "--auth-supernode-private-key", str(private_key),
             "--node-config", node_config,
             "--port", str(runtime_port or free_port()),
             *extra_args],
            self.site_env(name, env), home,
        )
        self._all.append(process)
        return process

    def site_env(self, name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """A node's environment: its own FEDSEG_HOME and FLWR_HOME under :meth:`site_home`."""
        home = self.site_home(name)
        return _base_env(FEDSEG_HOME=str(home / "fedseg"), FLWR_HOME=str(home / "flwr"), **(env or {}))

    def start_site_runner(self, name: str, runtime_port: int, *, site_config: Path,
                          extra_args: tuple[str, ...] = ()) -> Process:
        """``fedseg site runner`` beside a ``--isolation process`` SuperNode, as the runbook has it:
        the site's policy and audit log from its ``site.toml``; this checkout is the site's fedseg."""
        return self._start_beside(name, "site-runner", [
            sys.executable, "-m", "fedseg", "site", "runner", "--site-config", str(site_config),
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure", *extra_args])

    def start_stock_superexec(self, name: str, runtime_port: int) -> Process:
        """Flower's own ``flower-superexec`` on the node's runtime API: what would run a task's
        ClientApp unchecked, if the SuperNode handed it tasks."""
        return self._start_beside(name, "stock-superexec", [
            str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure"])

    def _start_beside(self, name: str, role: str, argv: list[str]) -> Process:
        process = _spawn(f"{role}-{name}", argv, self.site_env(name, {"PYTHONPATH": str(ROOT)}),
                         self.site_home(name))
        self._all.append(process)
        return process

    def site_home(self, name: str) -> Path:
        """The node's own directory: ``fedseg/`` is its FEDSEG_HOME, ``flwr/`` its FLWR_HOME."""
        return self.root / "sites-home" / name

    def add_site(self, name: str, site_config: Path, *, env: Mapping[str, str] | None = None) -> Process:
        """Key, registration and a SuperNode for one hospital; returns once it is activated."""
        private_key, public_key = self.site_key(name)
        self.register(public_key)
        node = self.start_supernode(name, private_key, f"site-config='{site_config}'", env=env)
        self.supernodes[name] = node
        return node

    def wait_activated(self) -> None:
        for name, node in self.supernodes.items():
            if not node.wait_for(ACTIVATED):
                raise RuntimeError(f"SuperNode {name} exited {node.popen.returncode}:\n{node.log()[-3000:]}")

    # ------------------------------------------------------------------ runs

    def run_app(self, run_config: str, *, while_running: Callable[[int], None] | None = None,
                timeout: float = 900, app: Path = ROOT) -> FlowerRun:
        """``flwr run <app> fedseg --run-config ... --stream``: returns when the run has ended.

        ``app`` is the app folder (default: this repository). ``while_running(run_id)`` is
        called once the run is submitted (e.g. to kill a node).
        """
        out_path = self.root / f"flwr-run-{time.monotonic_ns()}.log"
        with out_path.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "flwr"), "run", str(app), CONNECTION, "--run-config", run_config,
                 "--stream"],
                stdout=out, stderr=subprocess.STDOUT, env=self.operator_env, cwd=self.root,
            )
        try:
            run_id = self._submitted_run_id(proc, out_path)
            if while_running is not None:
                while_running(run_id)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return FlowerRun(run_id, out_path.read_text(errors="replace"), proc.returncode)

    @staticmethod
    def _submitted_run_id(proc: subprocess.Popen, out_path: Path) -> int:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = out_path.read_text(errors="replace")
            match = re.search(r"Successfully started run (\d+)", text)
            if match:
                return int(match.group(1))
            if proc.poll() is not None:
                raise AssertionError(f"flwr run exited {proc.returncode} without a run id:\n{text[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"flwr run printed no run id:\n{out_path.read_text(errors='replace')[-3000:]}")

    def run_status(self, run_id: int) -> dict:
        """The run as ``flwr list --run-id N --format json`` reports it."""
        listed = self.flwr("list", "--run-id", str(run_id), "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (run,) = json.loads(listed.stdout)["runs"]
        return run

    def logs(self) -> str:
        """Every process's log, for failure messages."""
        return "\n".join(f"===== {p.name}\n{p.log()[-4000:]}" for p in self._all)


def nginx_binary() -> str:
    """Debian's nginx (``.ci/run`` installs it)."""
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _wait_listening(process: Process, port: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.alive:
            raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n{process.log()[-3000:]}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} is not listening on {port}:\n{process.log()[-3000:]}")


def _spawn(name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Process:
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
    return Process(name, popen, log_path)
