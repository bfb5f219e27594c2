"""The site runner: app packages decided by the site's installed code before any of them runs.

The gate's rules on FABs built with Flower's own builder (fast), then the attack over real
processes: a TLS SuperLink, a SuperNode with ``--isolation process`` and ``fedseg site runner``
beside it; an approved package trains a round, and a tampered copy of this project (its
``client/handlers.py`` skips the policy and leaves a marker file) is refused before it is
installed: the coordinator gets an error reply naming the rule, the site's audit log a
``refusal``, and the marker never appears.
"""

from __future__ import annotations

import io
import os
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.cli.build import build_fab_from_disk
from tiny_app import write_tiny_app

from client.app_gate import REFUSAL_CODE, AppGate
from client.app_trust import identify_app, public_key_fingerprint, sign_app
from client.audit import AuditLog, verify_audit_log
from client.cli import site as site_cli
from client.errors import AppRefused, RunnerError
from client.site_runner import RunnerSettings
from client.verified_clientapp import SITE_PACKAGES, check_flower_seam, run_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_fab(tmp_path: Path) -> tuple[Path, bytes]:
    app = write_tiny_app(tmp_path / "tinyapp")
    return app, build_fab_from_disk(app)


def _gate(tmp_path: Path, policy: str) -> AppGate:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy)
    return AppGate(policy_file, tmp_path / "audit" / "site.jsonl")


def _decide(gate: AppGate, fab: bytes, fab_hash: str | None = None, run_id: int = 7):
    import hashlib

    return gate.decide(fab, fab_hash=fab_hash or hashlib.sha256(fab).hexdigest(), run_id=run_id,
                       server_round=1, kind="train")


def test_the_gate_allows_a_listed_package_and_refuses_any_other_naming_the_rule(
    tiny_fab: tuple[Path, bytes], tmp_path: Path
) -> None:
    app, fab = tiny_fab
    listed = identify_app(app)
    gate = _gate(tmp_path, f'[apps]\nallowed_hashes = ["sha256:{listed.content_sha256}"]\n')
    allowed = _decide(gate, fab)
    assert allowed.allowed and allowed.rule == "apps.allowed_hashes" and "content hash" in allowed.detail

    (app / "tinyapp" / "client.py").write_text("app = 'changed'\n")
    changed = build_fab_from_disk(app)
    refused = _decide(gate, changed, run_id=8)
    assert not refused.allowed and refused.rule == "apps.allowed_hashes"
    reason = refused.public_reason
    assert reason.startswith(f"{REFUSAL_CODE}: ") and "(rule [apps] allowed_hashes)" in reason
    assert refused.identity.content_sha256 in reason and "not signed" in reason
    assert str(tmp_path) not in reason and "policy.toml" not in reason  # nothing of the site leaves

    # bytes that are not the FAB the run names, a policy without [apps] rules, no policy, junk
    assert _decide(gate, fab, fab_hash="0" * 64).rule == "apps"
    assert _decide(_gate(tmp_path, "[training]\nmax_local_epochs = 1\n"), fab).rule == "apps"
    assert _decide(AppGate(tmp_path / "missing.toml", gate.audit_file), fab).rule == "policy-file"
    junk = _decide(gate, b"not a zip")
    assert not junk.allowed and junk.rule == "apps"

    records = AuditLog(gate.audit_file).records()
    assert [r["event"] for r in records] == ["app-verified"] + ["refusal"] * 5
    assert records[1]["run_id"] == "8" and records[1]["rule"] == "apps.allowed_hashes"
    assert records[1]["by"] == "site-runner" and records[1]["app"]["content_sha256"] == refused.identity.content_sha256
    assert verify_audit_log(gate.audit_file).ok


@pytest.mark.adversarial
def test_the_gate_checks_a_trusted_publishers_signature_over_the_content(
    tiny_fab: tuple[Path, bytes], tmp_path: Path
) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization

    app, _ = tiny_fab
    publisher = Ed25519PrivateKey.generate()
    raw = publisher.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    gate = _gate(tmp_path, f'[apps]\ntrusted_publishers = ["{base64.b64encode(raw).decode()}"]\n')
    sign_app(app, publisher)  # what `fedseg site app-sign` writes, before `flwr build`
    signed = _decide(gate, build_fab_from_disk(app))
    assert signed.allowed and signed.rule == "apps.trusted_publishers"
    assert public_key_fingerprint(publisher.public_key())[:16] in signed.detail

    (app / "tinyapp" / "server.py").write_text("app = 'changed after signing'\n")
    tampered = _decide(gate, build_fab_from_disk(app))
    assert not tampered.allowed and tampered.rule == "apps.trusted_publishers"
    assert tampered.public_reason.endswith(f", signed; ref {tampered.ref}")


def test_the_runner_refuses_to_start_without_an_apps_rule_or_a_flower_it_can_wrap(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nrequire_dp = true\n")
    started = CliRunner().invoke(site_cli, ["runner", "--policy", str(policy), "--audit-file",
                                            str(tmp_path / "audit.jsonl"), "--insecure"])
    assert started.exit_code == 1 and "sets no [apps] rule" in started.output, started.output
    missing = CliRunner().invoke(site_cli, ["runner", "--policy", str(tmp_path / "none.toml"), "--audit-file",
                                            str(tmp_path / "audit.jsonl"), "--insecure"])
    assert missing.exit_code == 1 and "no site policy at" in missing.output, missing.output
    with pytest.raises(RunnerError, match="exactly one of --insecure"):
        RunnerSettings(policy, tmp_path / "audit.jsonl")

    check_flower_seam()  # the installed flwr calls what the runner wraps
    changed = types.ModuleType("run_clientapp")
    changed.run_clientapp = lambda: None  # a Flower that no longer pulls the input there
    with pytest.raises(RunnerError, match="cannot check packages before they run"):
        check_flower_seam(changed)


_STAND_IN = """
def run_clientapp(**kwargs):
    events.append(("installed", install_from_fab(b"bytes nobody approved", skip_prompt=True)))
"""


def test_flowers_installer_takes_only_a_package_the_gate_approved(tmp_path: Path) -> None:
    """A Flower that installed before pulling (and so before the gate) installs nothing."""
    stand_in = types.ModuleType("run_clientapp")
    events: list[tuple[str, object]] = []
    stand_in.__dict__.update(events=events, install_from_fab=lambda *a, **k: "installed!",
                             pull_task_input=lambda client: None, push_message=lambda *a: None)
    exec(compile(_STAND_IN + "    pull_task_input(None)\n", "run_clientapp", "exec"), stand_in.__dict__)
    gate = _gate(tmp_path, f'[apps]\nallowed_hashes = ["{"0" * 64}"]\n')
    with pytest.raises(AppRefused, match="installs only an app package its gate approved"):
        run_task("token", gate, runtime_api_address="127.0.0.1:1", insecure=True, certificates=None,
                 parent_pid=None, flower=stand_in)
    assert events == [] and stand_in.install_from_fab(b"") == "installed!"  # and restored after


def test_the_unloaded_site_packages_are_the_projects_packages() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert SITE_PACKAGES == set(config["tool"]["importlinter"]["root_packages"])


# ------------------------------------------------------------------ real processes

NAME = "hospital-r"
SMALL = "num-server-rounds=1 min-sites=1 round-retries=0 image-size=32 unet-channels='8,16' batch-size=8 join-timeout=120.0"


@dataclass
class GatedSite:
    dep: object  # deployment_harness.Deployment
    site_dir: Path
    audit_file: Path
    flwr_home: Path
    tampered_app: Path
    marker: Path
    stock_superexec: object  # deployment_harness.Process


def _tampered_copy(out: Path, marker: Path) -> Path:
    """This project as Flower packages it, with a ``client/handlers.py`` that skips the policy."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):
                fab.extract(name, out)
    handlers = out / "client" / "handlers.py"
    source = handlers.read_text()
    assert "allowed_by = check_app(app, policy)" in source
    handlers.write_text(
        f"from pathlib import Path as _Path\n_Path({str(marker)!r}).write_text('tampered code ran')\n"
        + source.replace("allowed_by = check_app(app, policy)", "allowed_by = 'skipped'")
    )
    return out


@pytest.fixture(scope="module")
def gated_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatedSite]:
    from deployment_harness import Deployment, free_port

    from simulation.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("site-runner")
    (data,) = write_synthetic_sites(root / "data", sites=1, patients_per_site=2, slices=8, size=32, seed=13)
    site_dir = root / "site"
    site_dir.mkdir()
    site_toml = site_dir / "site.toml"
    site_toml.write_text(f'[site]\nname = "{NAME}"\n\n[source]\nkind = "folder"\npath = "{data}"\n')
    # the hospital allow-lists the app it reviewed: this project, by its content hash
    (site_dir / "policy.toml").write_text(
        f'[apps]\nallowed_hashes = ["sha256:{identify_app(ROOT).content_sha256}"]\n')
    marker = root / "tampered-code-ran"
    tampered = _tampered_copy(root / "tampered-app", marker)
    # only a process holding this secret can take the node's tasks (the runbook's set-up)
    secret = root / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    dep = Deployment.start(root / "federation")
    try:
        private_key, public_key = dep.site_key(NAME)
        dep.register(public_key)
        runtime_port = free_port()
        dep.supernodes[NAME] = dep.start_supernode(
            NAME, private_key, f"site-config='{site_toml}'", runtime_port=runtime_port,
            extra_args=("--isolation", "process", "--superexec-auth-secret-file", str(secret)))
        runner = dep.start_site_runner(NAME, runtime_port, site_config=site_toml,
                                       extra_args=("--superexec-auth-secret-file", str(secret)))
        dep.wait_activated()
        assert runner.wait_for("fedseg site runner: ClientApp tasks"), runner.log()
        # the attack's accomplice: Flower's stock executor on the node, trying to take the tasks
        stock = dep.start_stock_superexec(NAME, runtime_port)
        home = dep.site_home(NAME)
        yield GatedSite(dep, site_dir, home / "fedseg" / "audit" / f"{NAME}.jsonl", home / "flwr", tampered,
                        marker, stock)
    finally:
        dep.stop()


def _run_records(audit_file: Path, run_id: int) -> list[dict]:
    return [r for r in AuditLog(audit_file).records() if r.get("run_id") == str(run_id)]


@pytest.mark.deployment
@pytest.mark.slow
def test_an_approved_package_runs_a_round_under_the_site_runner(gated_site: GatedSite) -> None:
    dep = gated_site.dep
    run = dep.run_app(f"{SMALL} model-name='runner-approved'")
    status = dep.run_status(run.run_id)
    assert status["status"] == "finished:completed", f"{status}\n{run.output[-4000:]}\n{dep.logs()}"
    events = [r["event"] for r in _run_records(gated_site.audit_file, run.run_id)]
    # the runner's decision, then the approved ClientApp's own records, per message
    assert events[0] == "app-verified" and "data-access" in events and "round-result" in events, events
    verified = _run_records(gated_site.audit_file, run.run_id)[0]
    assert verified["by"] == "site-runner" and "content hash" in verified["allowed_by"]
    # the approved package's own code ran (from Flower's install folder), not the site's copy
    opened = next(r for r in _run_records(gated_site.audit_file, run.run_id) if r["event"] == "run")
    assert opened["app"]["installed_prefix"] == verified["app"]["fab_sha256"][:8], opened["app"]
    assert events.count("app-verified") == events.count("round-start")  # every message checked
    assert verify_audit_log(gated_site.audit_file).ok


@pytest.mark.adversarial
@pytest.mark.deployment
@pytest.mark.slow
def test_a_tampered_package_is_refused_before_any_of_its_code_runs(gated_site: GatedSite) -> None:
    dep = gated_site.dep
    tampered = identify_app(gated_site.tampered_app)
    run = dep.run_app(f"{SMALL} model-name='runner-tampered'", app=gated_site.tampered_app)
    status = dep.run_status(run.run_id)
    assert status["status"] != "finished:completed", f"{status}\n{run.output[-4000:]}"
    # the coordinator's log stream carries the site's error reply, naming the rule
    assert f"{REFUSAL_CODE}: the site's runner refused this app package" in run.output, run.output[-4000:]
    assert "(rule [apps] allowed_hashes)" in run.output and tampered.content_sha256 in run.output
    assert str(gated_site.site_dir) not in run.output  # no site path leaves

    records = _run_records(gated_site.audit_file, run.run_id)
    assert [r["event"] for r in records] == ["refusal"], records  # no run, no round, no data access
    assert records[0]["rule"] == "apps.allowed_hashes" and records[0]["by"] == "site-runner"
    assert records[0]["app"]["content_sha256"] == tampered.content_sha256
    assert not gated_site.marker.exists(), "code from the refused package ran at the site"
    assert "Start `flwr-clientapp` process" not in gated_site.stock_superexec.log(), (
        "the stock executor took a task around the runner")
    installed = [p.name for p in (gated_site.flwr_home / "apps").glob("*")]
    assert not any(p.endswith(tampered.fab_sha256[:8]) for p in installed), installed  # never installed
    assert verify_audit_log(gated_site.audit_file).ok
