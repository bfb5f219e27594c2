"""A real deployment on loopback ports: TLS SuperLinks with SuperNode authentication, hospital
SuperNodes (DICOM folders and an Orthanc PACS through DICOMweb), runs launched with `flwr run`.

Starting processes is the slow part, so the module shares two federations:

- the main one: a SuperLink and three SuperNodes (two folder sites, one PACS site), used by the
  refusal test and the two-round run;
- the dropout one: a second SuperLink and three folder SuperNodes whose run (min-sites=2, one
  SuperNode SIGKILLed during its round-1 training) is launched at set-up, in the background: the
  SuperLink needs up to 2 x 30 s of missed heartbeats (flwr 1.41, not configurable) to declare
  the dead node unavailable, and that wait overlaps the other tests instead of adding to them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployment_harness import CLIENTAPP_STARTED, BackgroundRun, Deployment, pki_cli
from orthanc import OrthancServer, orthanc_available, start_orthanc

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

# A tiny model (see tests/test_simulation_e2e.py); join-timeout short so that a missing node fails
# the run quickly instead of after ten minutes.
SMALL = "image-size=32 unet-channels='8,16' batch-size=8 join-timeout=120.0"
SITES = ("hospital-a", "hospital-b", "hospital-c")
DROPOUT_SITES = ("clinic-1", "clinic-2", "clinic-3")
VICTIM = "clinic-3"


@dataclass
class Dropout:
    """The dropout scenario's federation and its run, going on in the background."""

    dep: Deployment
    run: BackgroundRun
    log_offset: int  # the victim's log length before the run


@dataclass
class Federation:
    dep: Deployment
    pacs_site: str | None  # the site reading from Orthanc (None without Orthanc, outside CI)
    dropout: Dropout


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _site_toml(path: Path, name: str, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[site]\nname = "{name}"\n\n[source]\n{source}\n')
    return path


def _folder_site(configs: Path, name: str, folder: Path) -> Path:
    return _site_toml(configs / name / "site.toml", name, f'kind = "folder"\npath = "{folder}"')


def _kill_while_training(node, offset: int):
    def kill(run_id: int) -> None:
        # the node has received its round-1 train message and started its ClientApp
        assert node.wait_for(re.escape(CLIENTAPP_STARTED), timeout=300, since=offset), node.log()
        node.kill_node()

    return kill


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    from simulation.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("deployment")
    data = write_synthetic_sites(root / "data", sites=3, patients_per_site=2, slices=8, size=32, seed=11)
    configs = root / "site-configs"
    pacs: OrthancServer | None = None
    started: list[Deployment] = []
    dropout_run: BackgroundRun | None = None
    try:
        dep = Deployment.start(root / "federation")
        started.append(dep)
        dropout_dep = Deployment.start(root / "dropout-federation")
        started.append(dropout_dep)
        for name, folder in zip(DROPOUT_SITES, data, strict=True):
            dropout_dep.add_site(name, _folder_site(configs, name, folder))
        for name, folder in zip(SITES[:2], data[:2], strict=True):
            dep.add_site(name, _folder_site(configs, name, folder))
        if orthanc_available():
            # hospital-c's DICOM lives only in its PACS: loaded into Orthanc, read via DICOMweb
            pacs = start_orthanc(root / "orthanc")
            pacs.upload(sorted(p for p in data[2].rglob("*") if p.is_file() and p.suffix == ".dcm"))
            site_c = _site_toml(configs / SITES[2] / "site.toml", SITES[2],
                                f'kind = "dicomweb"\nurl = "{pacs.dicomweb_url}"')
            # credentials only in the node's environment
            dep.add_site(SITES[2], site_c, env={"FEDSEG_PACS_USERNAME": pacs.username,
                                                "FEDSEG_PACS_PASSWORD": pacs.password})
        elif _in_ci():
            pytest.fail("Orthanc with the DICOMweb plug-in is not installed; CI must test the PACS site")
        else:
            dep.add_site(SITES[2], _folder_site(configs, SITES[2], data[2]))
        dropout_dep.wait_activated()
        victim = dropout_dep.supernodes[VICTIM]
        offset = len(victim.log())
        dropout_run = BackgroundRun(
            dropout_dep, f"num-server-rounds=1 min-sites=2 model-name='deploy-dropout' {SMALL}",
            while_running=_kill_while_training(victim, offset),
        )
        dep.wait_activated()
        yield Federation(dep, SITES[2] if pacs else None, Dropout(dropout_dep, dropout_run, offset))
    finally:
        for deployment in reversed(started):
            deployment.stop()
        if dropout_run is not None:
            dropout_run.join(timeout=60)  # its flwr process ends with its SuperLink
        if pacs is not None:
            pacs.stop()


def _published(fedseg_home: Path, server_home: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The registry the coordinator's ServerApp wrote, read through fedseg's own listing."""
    from registry import default_store
    from registry.listing import list_versions

    monkeypatch.setenv("FEDSEG_HOME", str(server_home))
    try:
        return list_versions(default_store(), model)
    finally:
        monkeypatch.setenv("FEDSEG_HOME", str(fedseg_home))


def test_nodes_with_an_unregistered_key_or_the_wrong_ca_are_refused(
    federation: Federation, tmp_path: Path
) -> None:
    dep = federation.dep
    site_toml = _site_toml(tmp_path / "site.toml", "intruder", f'kind = "folder"\npath = "{tmp_path}"')
    # a well-formed key the operator never registered
    unregistered_key, _ = dep.site_key("intruder")
    unregistered = dep.start_supernode("intruder", unregistered_key, f"site-config='{site_toml}'")
    # a registered site's own key, but a CA that did not sign the SuperLink's certificate
    other_ca = tmp_path / "other-ca"
    pki_cli("init-ca", "--out", str(other_ca), "--consortium", "another-consortium")
    wrong_ca = dep.start_supernode("wrong-ca", dep.keys_dir / "hospital-a.key",
                                   f"site-config='{site_toml}'", root_certificates=other_ca / "ca.crt")
    for node in (unregistered, wrong_ca):
        node.popen.wait(timeout=120)
    # flwr's exit code 305 (printed; the process exits 1): it could not connect to the SuperLink
    assert unregistered.popen.returncode == 1 and "Exit Code: 305" in unregistered.log(), unregistered.log()
    assert "SuperNode ID" not in unregistered.log()
    assert "Failed to activate SuperNode" in unregistered.log(), unregistered.log()
    assert wrong_ca.popen.returncode == 1 and "Exit Code: 305" in wrong_ca.log(), wrong_ca.log()
    assert "SuperNode ID" not in wrong_ca.log()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log(), wrong_ca.log()

    # The SuperLink knows exactly the three registered sites, none of them refused.
    listed = dep.flwr("supernode", "list", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 3 and {n["status"] for n in nodes} == {"online"}, nodes


def test_two_round_run_over_tls_publishes_with_three_sites(
    federation: Federation, fedseg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = federation.dep
    assert all(node.alive for node in dep.supernodes.values()), dep.logs()
    run = dep.run_app(f"num-server-rounds=2 min-sites=3 model-name='deploy-unet' {SMALL}")
    status = dep.run_status(run.run_id)
    assert status["status"] == "finished:completed", f"{status}\n{run.output[-4000:]}\n{dep.logs()}"
    assert "aggregate_train: Received 3 results and 0 failures" in run.output, run.output[-4000:]
    # fedseg's own lines reach the operator through Flower's log stream (`flwr log`, `--stream`)
    assert re.search(r"fedseg: federated run \S+: 2 rounds", run.output), run.output[-4000:]
    assert "fedseg: published deploy-unet v1" in run.output, run.output[-4000:]

    (version,) = _published(fedseg_home, dep.server_home, "deploy-unet", monkeypatch)
    assert version["tags"]["rounds_completed"] == "2"
    assert set(json.loads(version["tags"]["sites"])) == set(SITES)
    assert set(json.loads(version["tags"]["eval_sites"])) == set(SITES)
    if federation.pacs_site:
        # the PACS site has no folder: it trained on what it fetched through DICOMweb into its cache
        cache = dep.site_home(federation.pacs_site) / "fedseg" / "cache" / "dicomweb"
        assert any(p.is_file() for p in cache.rglob("*")), f"nothing fetched into {cache}"
        assert json.loads(version["tags"]["sites"])[federation.pacs_site] > 0


@pytest.mark.robustness
def test_supernode_killed_mid_round_the_run_completes_and_publishes(
    federation: Federation, fedseg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """min-sites=2 over three SuperNodes; one is SIGKILLed while its round-1 training runs.

    The SuperLink answers the dead node's message with a "node unavailable" error once its
    heartbeat lapses, and the round goes on with the other two; no round-timeout is needed.
    """
    dropout = federation.dropout
    run = dropout.run.result()
    node = dropout.dep.supernodes[VICTIM]
    assert not node.alive
    this_run = node.log()[dropout.log_offset:]
    assert "Receiving: train message" in this_run and CLIENTAPP_STARTED in this_run, this_run
    assert "Sending: train message" not in this_run, "the node replied before it was killed"

    status = dropout.dep.run_status(run.run_id)
    assert status["status"] == "finished:completed", f"{status}\n{run.output[-4000:]}\n{dropout.dep.logs()}"
    assert "aggregate_train: Received 2 results and 1 failures" in run.output, run.output[-4000:]
    (version,) = _published(fedseg_home, dropout.dep.server_home, "deploy-dropout", monkeypatch)
    survivors = set(DROPOUT_SITES) - {VICTIM}
    assert set(json.loads(version["tags"]["sites"])) == survivors
    assert set(json.loads(version["tags"]["eval_sites"])) == survivors
