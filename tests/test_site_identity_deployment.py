"""Site identity over a real deployment: a TLS SuperLink with SuperNode authentication, two
hospital SuperNodes, enrolment as the runbooks do it, a run launched with `flwr run`.

hospital-b enrols honestly, then its site.toml claims to be hospital-a. Its node is authenticated
by the SuperLink with hospital-b's key and it signs with that key: the coordinator refuses every
reply of it, and the published version names hospital-a only, with hospital-a's own count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from client.cli import site as site_cli
from deployment_harness import Deployment, pki_cli

pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.adversarial]

SMALL = "image-size=32 unet-channels='8,16' batch-size=8 join-timeout=120.0"


def _site_toml(path: Path, name: str, folder: Path, node_key: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[site]\nname = "{name}"\nnode_key = "{node_key}"\n\n'
                    f'[source]\nkind = "folder"\npath = "{folder}"\n')
    return path


def _enrol(dep: Deployment, site: str, config: Path, work: Path) -> None:
    """`fedseg site check`, `fedseg pki sign-manifest` (the hospital), `fedseg pki enrol` (the operator)."""
    manifest, document = work / f"{site}.manifest.json", work / f"{site}.enrolment.json"
    checked = CliRunner().invoke(site_cli, ["check", "--config", str(config), "--manifest-out", str(manifest)])
    assert checked.exit_code == 0, checked.output
    pki_cli("sign-manifest", "--manifest", str(manifest), "--key", str(dep.keys_dir / f"{site}.key"),
            "--site", site, "--out", str(document))
    pki_cli("enrol", str(document), "--public-key", str(dep.keys_dir / f"{site}.key.pub"),
            "--dir", str(dep.server_home / "enrolment"))


def test_a_node_claiming_another_sites_name_is_refused_by_the_coordinator(
    tmp_path: Path, fedseg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulation.synthetic import write_synthetic_sites

    data = write_synthetic_sites(tmp_path / "data", sites=2, patients_per_site=2, slices=8, size=32, seed=5)
    configs, work = tmp_path / "site-configs", tmp_path / "enrolment-work"
    work.mkdir()
    with Deployment.start(tmp_path / "federation") as dep:
        keys = {s: dep.keys_dir / f"{s}.key" for s in ("hospital-a", "hospital-b")}
        honest = {s: _site_toml(configs / s / "honest.toml", s, folder, keys[s])
                  for s, folder in zip(keys, data, strict=True)}
        lying = _site_toml(configs / "hospital-b" / "site.toml", "hospital-a", data[1], keys["hospital-b"])
        dep.add_site("hospital-a", honest["hospital-a"])
        dep.add_site("hospital-b", lying)
        for site, config in honest.items():
            _enrol(dep, site, config, work)
        dep.wait_activated()
        run = dep.run_app(f"num-server-rounds=1 min-sites=1 model-name='identity-unet' {SMALL}")
        status = dep.run_status(run.run_id)
        assert status["status"] == "finished:completed", run.output[-4000:] + dep.logs()
        assert "site identities: enrolled: 2 site(s)" in run.output, run.output[-4000:]
        assert ("rejected the update of hospital-a: identity: node " in run.output
                and "authenticated with the key enrolled for 'hospital-b', but its reply claims to be "
                    "'hospital-a'" in run.output), run.output[-4000:]

        from registry import default_store
        from registry.listing import list_versions

        monkeypatch.setenv("FEDSEG_HOME", str(dep.server_home))
        (version,) = list_versions(default_store(), "identity-unet")
        monkeypatch.setenv("FEDSEG_HOME", str(fedseg_home))
    tags = version["tags"]
    assert tags["site_identity"] == "enrolled"
    sites = json.loads(tags["sites"])
    assert list(sites) == ["hospital-a"] and 0 < sites["hospital-a"] <= 16  # hospital-a's own slices
    assert list(json.loads(tags["eval_sites"])) == ["hospital-a"]
