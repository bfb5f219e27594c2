"""Operators, not sites, run the federation: a real SuperLink on loopback behind the real nginx
gateway that ``fedseg coordinator gateway`` configures (tests/deployment_harness.py).

One federation for the module: the SuperLink, the gateway, the operator's tunnel
(``fedseg coordinator tunnel`` with an operator certificate) and one registered hospital whose
SuperNode dials the sites' address. A hospital knows that address, the consortium CA and its own
node key; with them it tries the operator's commands (``flwr run``, ``flwr stop``, ``flwr list``)
and the Control and Runtime APIs' paths directly, also disguised, and at the operators' address
without an operator certificate. Everything is refused by the gateway, and the SuperLink, asked
through the operator's path, holds no run.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployment_harness import ACTIVATED, BIN, ROOT, Deployment, _base_env, flwr_config, nginx_binary
from privacy.pki import issue_client_certificate

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

SITE = "hospital-a"
SITE_REFUSAL = "fedseg gateway: the sites' address serves the Fleet API only"
NO_OPERATOR_CERT = "fedseg gateway: the operators' address requires a client certificate of the operator CA"


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not Path(nginx_binary()).is_file():
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("Debian's nginx is not installed; CI must test the gateway (.ci/run installs it)")
        pytest.skip("Debian's nginx is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("gateway")
    site_toml = root / "site-configs" / SITE / "site.toml"
    site_toml.parent.mkdir(parents=True)
    # joining reads no data: the folder is only read when a ClientApp runs
    site_toml.write_text(f'[site]\nname = "{SITE}"\n\n[source]\nkind = "folder"\npath = "{root}"\n')
    deployment = Deployment.start(root / "federation", gateway=True)
    try:
        deployment.add_site(SITE, site_toml)
        deployment.wait_activated()
        yield deployment
    finally:
        deployment.stop()


def _site_flwr(dep: Deployment, home: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` with a hospital's connection: ADDRESS and the consortium CA."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(flwr_config(address, root_certificates=dep.ca_cert))
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                          env=_base_env(FLWR_HOME=str(home)), cwd=dep.root, timeout=120)


def _tls(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return context


def _operator_runs(dep: Deployment) -> list[dict]:
    listed = dep.flwr("list", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["runs"]


@pytest.mark.adversarial
def test_a_site_cannot_start_stop_or_list_runs(dep: Deployment, tmp_path: Path) -> None:
    assert dep.gateway is not None
    site_address = f"127.0.0.1:{dep.port}"
    # the SuperLink itself listens on loopback only, on its own port; sites dial the gateway
    assert f"Uvicorn running on https://127.0.0.1:{dep.superlink_port}" in dep.superlink.log()
    assert dep.port != dep.superlink_port

    attempts = {
        "run": ("run", str(ROOT), "fedseg", "--run-config", "num-server-rounds=1 model-name='site-run'"),
        "stop": ("stop", "1", "fedseg"),
        "list": ("list", "fedseg"),
        "log": ("log", "1", "fedseg", "--show"),
        "register": ("supernode", "list", "fedseg"),
    }
    for name, args in attempts.items():
        done = _site_flwr(dep, tmp_path / "site-flwr", site_address, *args)
        out = done.stdout + done.stderr
        assert done.returncode != 0, f"flwr {name} through the sites' address succeeded:\n{out}"
        assert "404" in out and "Successfully started run" not in out, out
    # the same commands at the operators' address, without an operator certificate
    for name in ("run", "list"):
        done = _site_flwr(dep, tmp_path / "site-at-operator", f"127.0.0.1:{dep.gateway.operator_port}",
                          *attempts[name])
        assert done.returncode != 0, done.stdout + done.stderr
        assert "403" in done.stdout + done.stderr, done.stdout + done.stderr

    # The APIs' paths by hand: Control and Runtime, plain, encoded and dotted; GET on the Fleet API.
    with httpx.Client(base_url=f"https://{site_address}", verify=_tls(dep.ca_cert, None), timeout=30) as site:
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/stop-run",
                     "/v1/runtime/acquire-task", "/v1/runtime/push-messages",
                     "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/list-runs",
                     "/v1/fleet/..%2fcontrol/list-runs", "/v1/fleet//../control/list-runs",
                     "/v1/Control/list-runs", "/v1/fleet/pull-messages/../../control/list-runs",
                     "/docs", "/openapi.json"):
            response = site.post(path, content=b"", headers={"content-type": "application/protobuf"})
            assert response.status_code == 404, f"{path}: {response.status_code} {response.text[:200]}"
            assert SITE_REFUSAL in response.text, f"{path}: {response.text[:200]}"
        assert site.get("/v1/fleet/pull-messages").status_code == 403
        assert site.get("/health").status_code == 200  # the probe still works
    # the gateway answered every one of them itself (its access log, the sites' port)
    access = (dep.gateway.nginx.log_path.parent / "access.log").read_text()
    site_lines = [line for line in access.splitlines() if f" {dep.port} " in line]
    control = [line for line in site_lines if re.search(r'"\S+ /v1/(control|runtime|fleet/\.|fleet/%)', line)]
    assert len(control) >= 12 and all(" 404 " in line for line in control), "\n".join(control)
    # and, asked through the operator's path, the SuperLink holds no run
    assert _operator_runs(dep) == []


def test_a_registered_site_joins_through_the_sites_address(dep: Deployment) -> None:
    assert dep.gateway is not None
    node = dep.supernodes[SITE]
    assert node.alive and ACTIVATED.search(node.log()), node.log()[-3000:]
    listed = dep.flwr("supernode", "list", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    (record,) = json.loads(listed.stdout)["nodes"]
    assert record["status"] == "online", record
    # the node's Fleet API calls went through the gateway's sites' listener
    access = (dep.gateway.nginx.log_path.parent / "access.log").read_text()
    assert re.search(rf' {dep.port} 127\.0\.0\.1 "-" "POST /v1/fleet/activate-node HTTP/1.1" 200', access), access


@pytest.mark.adversarial
def test_operators_reach_the_control_api_with_their_certificate_only(dep: Deployment, tmp_path: Path) -> None:
    gateway = dep.gateway
    assert gateway is not None
    operator_url = f"https://127.0.0.1:{gateway.operator_port}"
    # a client certificate that the consortium CA signed (not the operator CA) is refused
    other = issue_client_certificate(dep.ca_cert.parent, tmp_path / "not-an-operator", name="hospital-a")
    for cert in (None, (other.cert_path, other.key_path)):
        with httpx.Client(base_url=operator_url, verify=_tls(dep.ca_cert, cert), timeout=30) as client:
            response = client.post("/v1/control/list-runs", content=b"")
            assert response.status_code == 403 and NO_OPERATOR_CERT in response.text, response.text
    # with the operator's certificate: the Control API only, never the Runtime API
    with httpx.Client(base_url=operator_url, timeout=30,
                      verify=_tls(dep.ca_cert, (gateway.operator_cert, gateway.operator_key))) as client:
        assert client.post("/health").status_code == 403  # GET only
        assert client.get("/health").status_code == 200
        refused = client.post("/v1/runtime/acquire-task", content=b"")
        assert refused.status_code == 404 and "serves the Control API only" in refused.text, refused.text

    # The operator's flwr, through the tunnel: start a run, see it, stop it.
    started = dep.flwr("run", str(ROOT), "fedseg", "--run-config",
                       "num-server-rounds=1 min-sites=2 join-timeout=600.0 model-name='operator-run'")
    match = re.search(r"Successfully started run (\d+)", started.stdout + started.stderr)
    assert started.returncode == 0 and match, started.stdout + started.stderr
    run_id = int(match.group(1))
    assert [int(run["run-id"]) for run in _operator_runs(dep)] == [run_id]
    shown = dep.flwr("log", str(run_id), "fedseg", "--show")  # a streamed Control API response
    assert shown.returncode == 0, shown.stdout + shown.stderr
    stopped = dep.flwr("stop", str(run_id), "fedseg")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert dep.run_status(run_id)["status"] == "finished:stopped"
    access = (gateway.nginx.log_path.parent / "access.log").read_text()
    assert f'{gateway.operator_port} 127.0.0.1 "CN=operator" "POST /v1/control/start-run HTTP/1.1" 200' in access
