"""A real Orthanc PACS for tests: Debian's ``orthanc`` plus ``orthanc-dicomweb`` on a loopback port.

Usage::

    from orthanc import start_orthanc  # tests/ is on sys.path under pytest

    server = start_orthanc(tmp_path)          # raises OrthancUnavailable without the binary
    server.upload(dicom_files)                # POST /instances, one file at a time
    ... server.dicomweb_url, server.username, server.password ...
    server.stop()

or the pytest fixture :func:`orthanc` (function scope), which skips when Orthanc is not
installed and CI is not set, and fails under ``CI=true`` (CI must test the PACS path).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

__all__ = [
    "ORTHANC_BINARY",
    "PLUGINS_DIR",
    "orthanc_binary",
    "OrthancServer",
    "OrthancUnavailable",
    "orthanc_available",
    "require_orthanc",
    "start_orthanc",
    "orthanc",
]

ORTHANC_BINARY = "Orthanc"
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
_READY_TIMEOUT_S = 60.0


class OrthancUnavailable(RuntimeError):
    """The Orthanc binary or its DICOMweb plug-in is not installed."""


def orthanc_binary() -> str | None:
    """The ``Orthanc`` executable: on PATH, or Debian's ``/usr/sbin/Orthanc``."""
    return shutil.which(ORTHANC_BINARY) or shutil.which(ORTHANC_BINARY, path="/usr/sbin:/usr/local/sbin")


def orthanc_available() -> bool:
    """Whether ``Orthanc`` and its DICOMweb plug-in are installed."""
    return orthanc_binary() is not None and any(PLUGINS_DIR.glob("*DicomWeb*"))


def require_orthanc() -> None:
    """Skip the calling test without Orthanc, except under CI (``CI`` set): there it fails.

    CI installs ``orthanc`` and ``orthanc-dicomweb`` (``.ci/run``); a missing PACS there is a
    broken set-up, not a reason to skip the tests of the PACS path.
    """
    if orthanc_available():
        return
    why = ("Orthanc with the DICOMweb plug-in is not installed "
           "(apt-get install -y orthanc orthanc-dicomweb)")
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{why}; CI must run the PACS tests")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc; ``stop()`` ends it (the fixture does so for you)."""

    url: str  # Orthanc's REST root, e.g. http://127.0.0.1:41234
    username: str
    password: str
    workdir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"

    @property
    def log_file(self) -> Path:
        return self.workdir / "orthanc.log"

    def client(self) -> httpx.Client:
        """An authenticated client of Orthanc's REST API."""
        return httpx.Client(base_url=self.url, auth=(self.username, self.password), timeout=30.0)

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """POST each file to ``/instances``; returns Orthanc's instance ids.

        Raises
        ------
        RuntimeError
            Orthanc refused a file (the message names it and quotes Orthanc's answer).
        """
        ids: list[str] = []
        with self.client() as client:
            for path in paths:
                response = client.post("/instances", content=Path(path).read_bytes(),
                                       headers={"Content-Type": "application/dicom"})
                if response.status_code != 200:
                    raise RuntimeError(f"Orthanc refused {path}: HTTP {response.status_code} "
                                       f"{response.text[:300]}")
                ids.append(str(response.json()["ID"]))
        return ids

    def delete_instance(self, orthanc_id: str) -> None:
        """Remove one instance (e.g. to change a series under a client's cache)."""
        with self.client() as client:
            client.delete(f"/instances/{orthanc_id}").raise_for_status()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _config(workdir: Path, port: int, username: str, password: str) -> dict:
    return {
        "Name": "fedseg-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpServerEnabled": True,
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "DicomServerEnabled": False,  # no DIMSE port: DICOMweb only
        "Plugins": [str(PLUGINS_DIR)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "HttpThreadsCount": 8,
        "StorageCompression": False,
    }


def start_orthanc(workdir: Path, *, attempts: int = 3) -> OrthancServer:
    """Start Orthanc with DICOMweb and HTTP basic authentication; wait until it answers.

    Parameters
    ----------
    workdir : Path
        Holds the generated ``config.json``, the storage and ``orthanc.log``.
    attempts : int
        Ports to try (a free port can be taken between choosing and binding it).

    Raises
    ------
    OrthancUnavailable
        The binary or the DICOMweb plug-in is missing.
    RuntimeError
        Orthanc did not become ready; the message ends with its log.
    """
    if not orthanc_available():
        raise OrthancUnavailable("Orthanc and its DICOMweb plug-in are not installed")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    username, password = "fedseg-test", secrets.token_urlsafe(16)
    last_log = ""
    for _ in range(attempts):
        port = _free_port()
        config = workdir / "config.json"
        config.write_text(json.dumps(_config(workdir, port, username, password), indent=2))
        log_file = workdir / "orthanc.log"
        with log_file.open("wb") as log:
            process = subprocess.Popen([str(orthanc_binary()), str(config)], stdout=log,
                                       stderr=subprocess.STDOUT, cwd=workdir)
        server = OrthancServer(f"http://127.0.0.1:{port}", username, password, workdir, process)
        if _wait_ready(server):
            return server
        server.stop()
        last_log = log_file.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"Orthanc did not start after {attempts} attempts; its log:\n{last_log}")


def _wait_ready(server: OrthancServer) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    with server.client() as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if client.get("/dicom-web/studies", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    return False


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh, empty Orthanc for one test (skipped without Orthanc unless under CI)."""
    require_orthanc()
    server = start_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop()
