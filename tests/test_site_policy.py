"""The site policy's [apps] and [metrics] rules: app hashes and publisher signatures computed
with Flower's own FAB builder and installer, and enforced by the real ClientApp."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flower_messages import coded_failure, instruction
from tiny_app import write_tiny_app
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab

from client.app import create_client_app
from client.app_trust import SIGNATURE_FILE, fab_file_identity, identify_app, sign_app
from client.audit import AuditLog
from client.cli import site as site_cli
from client.errors import PolicyError, PolicyViolation
from client.policy import check_app, load_policy
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec

SPEC = ModelSpec(channels=(8, 16), image_size=32)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_tiny_app(tmp_path / "tinyapp-src")


def _pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_app_hashes_match_what_flower_builds_and_installs(app_dir: Path, tmp_path: Path) -> None:
    fab = build_fab_from_disk(app_dir)
    identity = identify_app(app_dir)
    assert identity.error == "" and identity.fab_id == "acme/tinyapp" and identity.fab_version == "1.0.0"
    assert identity.fab_sha256 == hashlib.sha256(fab).hexdigest()  # Flower's FAB hash
    fab_file = tmp_path / "tinyapp.fab"
    fab_file.write_bytes(fab)
    assert fab_file_identity(fab_file).content_sha256 == identity.content_sha256

    # where the SuperNode puts it: $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>
    installed = install_from_fab(fab, install_dir=tmp_path / "flwr-home", skip_prompt=True)
    assert installed.parent.name == "apps"
    at_site = identify_app(installed)
    assert at_site.installed_prefix == identity.fab_sha256[:8]
    assert (at_site.fab_sha256, at_site.content_sha256) == (identity.fab_sha256, identity.content_sha256)
    (installed / "tinyapp" / "client.py").write_text("app = 'patched'\n")  # changed after install
    assert "differs from the FAB Flower installed" in identify_app(installed).error

    shown = CliRunner().invoke(site_cli, ["app-hash", str(fab_file)])
    assert shown.exit_code == 0, shown.output
    assert f"sha256:{identity.fab_sha256}" in shown.output and f"sha256:{identity.content_sha256}" in shown.output


def test_allowed_hashes_and_trusted_publishers(app_dir: Path, tmp_path: Path) -> None:
    publisher, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    raw = publisher.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    policy_file = tmp_path / "policy.toml"
    _pem(publisher, tmp_path / "publisher.pub.pem")
    for spec in ("publisher.pub.pem", base64.b64encode(raw).decode()):  # a file or the raw key
        policy_file.write_text(f'[apps]\ntrusted_publishers = ["{spec}"]\n')
        policy = load_policy(policy_file)
        with pytest.raises(PolicyViolation, match="not signed") as refused:
            check_app(identify_app(app_dir), policy)
        assert refused.value.rule == "apps.trusted_publishers"

    sign_app(app_dir, publisher)
    assert (app_dir / SIGNATURE_FILE).is_file()
    signed = identify_app(app_dir)
    assert "apps.trusted_publishers" in check_app(signed, policy)
    # the signature covers the content: a changed file is no longer the signed app
    (app_dir / "tinyapp" / "client.py").write_text("app = 'changed'\n")
    with pytest.raises(PolicyViolation, match="does not allow this app"):
        check_app(identify_app(app_dir), policy)
    # signed by a key the site does not trust
    sign_app(app_dir, stranger)
    with pytest.raises(PolicyViolation, match="signed by key"):
        check_app(identify_app(app_dir), policy)

    # an allow-listed hash is enough on its own (either rule suffices)
    current = identify_app(app_dir)
    policy_file.write_text(f'[apps]\ntrusted_publishers = ["publisher.pub.pem"]\n'
                           f'allowed_hashes = ["sha256:{current.fab_sha256.upper()}"]\n')
    assert "FAB hash" in check_app(current, load_policy(policy_file))
    policy_file.write_text(f'[apps]\nallowed_hashes = ["{current.content_sha256}"]\n')
    assert "content hash" in check_app(current, load_policy(policy_file))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[apps]\nallowed_hashes = ["abc"]\n', "is not a SHA-256"),
        ('[apps]\nallowed_hashes = "' + "a" * 64 + '"\n', "must be a list"),
        ('[apps]\ntrusted_publishers = ["missing.pem"]\n', "trusted publisher key"),
        ('[apps]\ntrusted_publishers = ["AAAA"]\n', "an Ed25519 public key has 32"),
        ('[apps]\nallowed_hash = []\n', "unknown key"),
        ("[metrics]\nallowed = [1]\n", "list of non-empty strings"),
        ("[metric]\nallowed = []\n", "unknown section"),
    ],
)
def test_bad_policy_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


# ------------------------------------------------------------------ the real ClientApp


def _call(site: Path, kind: str, server_round: int = 1, run_id: int = 5):
    config = RoundInstructions(spec=SPEC, batch_size=8).to_config()
    config["server-round"] = server_round
    message = instruction(RecordDict({"arrays": ArrayRecord(build_unet(SPEC).state_dict()),
                                      "config": ConfigRecord(config)}), kind, run_id=run_id)
    context = Context(run_id=run_id, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(site), "site-name": "h1", "cache-dir": "none"})
    return create_client_app()(message, context)


@pytest.fixture
def site_dir(synthetic_sites: list[Path], tmp_path: Path) -> Path:
    copy = tmp_path / "site"
    shutil.copytree(synthetic_sites[0], copy)
    return copy


def test_client_app_refuses_an_app_not_on_the_allow_list_before_reading_data(site_dir: Path,
                                                                             fedseg_home: Path) -> None:
    (site_dir / "policy.toml").write_text(f'[apps]\nallowed_hashes = ["sha256:{"0" * 64}"]\n')
    refused = coded_failure(_call(site_dir, MessageType.TRAIN), "FEDSEG-POLICY-001", fedseg_home / "audit" / "h1.jsonl")
    assert refused["rule"] == "[apps] allowed_hashes"  # the rule leaves the site, the app's hashes stay
    assert refused["audit"]["rule"] == "apps.allowed_hashes"
    assert "does not allow this app ([apps] allowed_hashes)" in refused["audit"]["reason"]
    records = AuditLog(fedseg_home / "audit" / "h1.jsonl").records()
    assert [r["event"] for r in records] == ["run", "round-start", "refusal"]  # no data access
    app = records[0]["app"]
    assert len(app["fab_sha256"]) == 64 and app["fab_id"] == "fedseg/fedseg"

    # the hospital allow-lists the app it runs (here: the project itself, as `flwr run .` sends it)
    (site_dir / "policy.toml").write_text(f'[apps]\nallowed_hashes = ["{app["content_sha256"]}"]\n')
    reply = _call(site_dir, MessageType.TRAIN, run_id=5)
    assert reply.content["metrics"]["num-examples"] > 0
    assert "content hash" in AuditLog(fedseg_home / "audit" / "h1.jsonl").records()[-1]["app_allowed_by"]


def test_metrics_policy_drops_keys_or_refuses_without_the_weight(site_dir: Path, fedseg_home: Path) -> None:
    (site_dir / "policy.toml").write_text('[metrics]\nallowed = ["num-examples", "train-loss", "dice"]\n')
    train = _call(site_dir, MessageType.TRAIN).content["metrics"]
    assert set(train) == {"num-examples", "train-loss"}
    evaluate = _call(site_dir, MessageType.EVALUATE).content["metrics"]
    assert set(evaluate) == {"num-examples", "dice"}
    result = AuditLog(fedseg_home / "audit" / "h1.jsonl").records()[-1]
    assert result["event"] == "round-result" and set(result["metrics"]) == {"num-examples", "dice"}
    assert result["dropped_metrics"] == ["dice-intersection", "dice-predicted", "dice-truth", "eval-loss"]

    (site_dir / "policy.toml").write_text('[metrics]\nallowed = ["dice"]\n')
    refused = coded_failure(_call(site_dir, MessageType.EVALUATE, server_round=2), "FEDSEG-POLICY-001",
                            fedseg_home / "audit" / "h1.jsonl")
    assert refused["rule"] == "[metrics] allowed"
    assert "['num-examples']" in refused["audit"]["reason"]
