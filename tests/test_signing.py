"""Signed models against a real sqlite store: sign at publish, verify at load and in serving."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from evidence import evaluated
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import TrackingRun, default_store, load_model, publish_model
from registry.cli_keys import keygen
from registry.errors import ModelSignatureError, RegistryError, SigningKeyError
from registry.signing import (
    SIGNATURE_FILE,
    embedded_key_paths,
    generate_keypair,
    key_fingerprint,
    load_signing_key,
    model_digest,
    sign_model_dir,
    verify_model_dir,
)
from serving import ServingSettings, create_app, registry_loader
from serving.cli import serve

SPEC = ModelSpec(channels=(4, 8), image_size=32)
NAME = "signed-unet"
URI = f"models:/{NAME}@champion"


def _publish(seed: int = 0):
    store = default_store()
    torch.manual_seed(seed)
    net = build_unet(SPEC)
    run = TrackingRun.start(store, "fedseg-test", "signing", {})
    published = publish_model(store, run, NAME, net.state_dict(), SPEC, {"dice_pooled": 0.5}, evaluated())
    run.end(True)
    return net, published


def _stored_model_dir(home: Path) -> Path:
    """The one logged model directory under $FEDSEG_HOME/mlartifacts."""
    (mlmodel,) = (home / "mlartifacts").rglob("MLmodel")
    return mlmodel.parent


def _flip_one_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- the happy path


def test_published_model_is_signed_verified_and_loaded(fedseg_home: Path) -> None:
    net, _ = _publish(seed=1)
    model_dir = _stored_model_dir(fedseg_home)
    written = json.loads((model_dir / SIGNATURE_FILE).read_text())
    assert written["algorithm"] == "ed25519"
    assert written["digest"] == model_digest(model_dir)
    assert {"signature", "key_fingerprint", "signed_at"} <= written.keys()

    loaded = load_model(default_store(), URI)
    assert loaded.signature is not None
    assert loaded.signature.digest == written["digest"]
    assert loaded.tags["signature.digest"] == written["digest"]
    assert loaded.tags["signature.key_fingerprint"] == key_fingerprint(load_signing_key())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict[key], value)


def test_embedded_key_is_private_and_its_public_key_is_trusted(fedseg_home: Path) -> None:
    _publish()
    private_path, public_path = embedded_key_paths()
    assert private_path == fedseg_home.resolve() / "keys" / "consortium-signing-key.pem"
    assert public_path == fedseg_home.resolve() / "keys" / "trusted" / "consortium.pub.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(private_path.parent.stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in private_path.read_bytes()  # PKCS8
    # created once, then reused
    assert key_fingerprint(load_signing_key()) == key_fingerprint(load_signing_key())
    verify_model_dir(_stored_model_dir(fedseg_home))  # default trusted dir holds its public key


def test_digest_covers_every_file_but_the_signature(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    (model_dir / "artifacts").mkdir(parents=True)
    for rel in ("MLmodel", "pyfunc_model.py", "artifacts/state_dict.pt", "artifacts/spec.json"):
        (model_dir / rel).write_bytes(f"content of {rel}".encode())
    digests = {model_digest(model_dir)}
    for rel in ("MLmodel", "pyfunc_model.py", "artifacts/state_dict.pt", "artifacts/spec.json"):
        _flip_one_byte(model_dir / rel, offset=0)
        digests.add(model_digest(model_dir))
    assert len(digests) == 5
    before = model_digest(model_dir)
    (model_dir / SIGNATURE_FILE).write_text("{}")
    assert model_digest(model_dir) == before
    (model_dir / "extra.txt").write_text("x")
    assert model_digest(model_dir) != before


# ----------------------------------------------------------------------------- refusals


def test_one_flipped_byte_in_the_stored_weights_is_refused(fedseg_home: Path) -> None:
    _publish()
    state = _stored_model_dir(fedseg_home) / "artifacts" / "state_dict.pt"
    _flip_one_byte(state)
    with pytest.raises(ModelSignatureError, match=r"altered: digest mismatch \(expected \w+, got \w+\)") as err:
        load_model(default_store(), URI)
    assert "artifacts/state_dict.pt" in str(err.value) and URI in str(err.value)


def test_missing_signature_is_refused_as_unsigned(fedseg_home: Path) -> None:
    _publish()
    (_stored_model_dir(fedseg_home) / SIGNATURE_FILE).unlink()
    with pytest.raises(ModelSignatureError, match=r"unsigned \(no signature.json\)"):
        load_model(default_store(), URI)
    assert load_model(default_store(), URI, verify=False).signature is None


def test_signature_by_an_untrusted_key_is_refused(fedseg_home: Path) -> None:
    _publish()
    stranger = Ed25519PrivateKey.generate()
    sign_model_dir(_stored_model_dir(fedseg_home), stranger)  # re-signed by someone else
    with pytest.raises(ModelSignatureError, match=f"signed by untrusted key {key_fingerprint(stranger)[:16]}"):
        load_model(default_store(), URI)
    # trusting it explicitly makes it load (with the consortium key, which signed the evidence)
    trusted = [stranger.public_key(), load_signing_key().public_key()]
    assert load_model(default_store(), URI, trusted_keys=trusted).version == 1
    with pytest.raises(ModelSignatureError, match="the signed evidence of signed-unet v1: signed by untrusted key"):
        load_model(default_store(), URI, trusted_keys=[stranger.public_key()])


def test_a_forged_digest_does_not_verify(fedseg_home: Path) -> None:
    _publish()
    model_dir = _stored_model_dir(fedseg_home)
    _flip_one_byte(model_dir / "artifacts" / "state_dict.pt")
    sig = json.loads((model_dir / SIGNATURE_FILE).read_text())
    sig["digest"] = model_digest(model_dir)  # the attacker updates the digest but cannot sign it
    (model_dir / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(ModelSignatureError, match="signature does not verify"):
        load_model(default_store(), URI)


def test_no_trusted_keys_is_refused(fedseg_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _publish()
    empty = tmp_path / "no-keys"
    empty.mkdir()
    monkeypatch.setenv("FEDSEG_TRUSTED_KEYS", str(empty))
    with pytest.raises(ModelSignatureError, match=r"no trusted keys configured \(FEDSEG_TRUSTED_KEYS\)"):
        load_model(default_store(), URI)
    monkeypatch.setenv("FEDSEG_TRUSTED_KEYS", str(tmp_path / "absent.pem"))
    with pytest.raises(ModelSignatureError, match="absent.pem does not exist"):
        load_model(default_store(), URI)


# ----------------------------------------------------------------------------- production keys


def test_configured_signing_key_and_trusted_keys(
    fedseg_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_path, public_path = generate_keypair(tmp_path / "consortium", passphrase=b"s3cret")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in private_path.read_bytes()
    monkeypatch.setenv("FEDSEG_SIGNING_KEY", str(private_path))
    monkeypatch.setenv("FEDSEG_SIGNING_KEY_PASSPHRASE", "s3cret")
    other_public = generate_keypair(tmp_path / "other")[1]
    monkeypatch.setenv("FEDSEG_TRUSTED_KEYS", f"{other_public}, {public_path}")  # a list of files
    _publish()
    assert not embedded_key_paths()[0].exists()  # the embedded key is not created
    loaded = load_model(default_store(), URI)
    assert loaded.tags["signature.key_fingerprint"] == loaded.signature.key_fingerprint
    assert loaded.signature.key_fingerprint == key_fingerprint(load_signing_key())

    # a directory of *.pem works too, and only listed keys are trusted
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / "consortium.pem").write_bytes(public_path.read_bytes())
    monkeypatch.setenv("FEDSEG_TRUSTED_KEYS", str(trusted_dir))
    assert load_model(default_store(), URI).version == 1
    monkeypatch.setenv("FEDSEG_TRUSTED_KEYS", str(other_public))
    with pytest.raises(ModelSignatureError, match="untrusted key"):
        load_model(default_store(), URI)


def test_bad_signing_key_settings_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private_path, _ = generate_keypair(tmp_path / "k", passphrase=b"right")
    monkeypatch.setenv("FEDSEG_SIGNING_KEY", str(private_path))
    with pytest.raises(SigningKeyError, match="encrypted: set FEDSEG_SIGNING_KEY_PASSPHRASE"):
        load_signing_key()
    monkeypatch.setenv("FEDSEG_SIGNING_KEY_PASSPHRASE", "wrong")
    with pytest.raises(SigningKeyError, match="wrong FEDSEG_SIGNING_KEY_PASSPHRASE"):
        load_signing_key()
    monkeypatch.setenv("FEDSEG_SIGNING_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(SigningKeyError, match="is not a file"):
        load_signing_key()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k")


def test_keygen_cli_prints_where_keys_go_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    first = CliRunner().invoke(keygen, ["--out", str(out)])
    assert first.exit_code == 0, first.output
    private_path, public_path = out / "consortium-signing-key.pem", out / "consortium.pub.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    fingerprint = key_fingerprint(load_public(public_path))
    assert fingerprint[:16] in first.output
    assert "FEDSEG_SIGNING_KEY" in first.output and "FEDSEG_TRUSTED_KEYS" in first.output
    before = private_path.read_bytes()
    second = CliRunner().invoke(keygen, ["--out", str(out)])
    assert second.exit_code != 0
    assert "refusing to overwrite" in second.output
    assert private_path.read_bytes() == before


def load_public(path: Path):
    from registry.signing import load_trusted_keys

    (key,) = load_trusted_keys(str(path)).values()
    return key


# ----------------------------------------------------------------------------- serving refuses


def test_service_is_not_ready_on_an_altered_model(fedseg_home: Path) -> None:
    _publish()
    _flip_one_byte(_stored_model_dir(fedseg_home) / "artifacts" / "state_dict.pt")
    with TestClient(create_app(ServingSettings(model_uri=URI, device="cpu"), loader=registry_loader)) as c:
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 503
        assert "altered: digest mismatch" in ready.json()["detail"]


def test_serve_cli_refuses_an_altered_model(fedseg_home: Path) -> None:
    _publish()
    _flip_one_byte(_stored_model_dir(fedseg_home) / "artifacts" / "state_dict.pt")
    result = CliRunner().invoke(serve, ["--model", URI, "--port", "1"])
    assert result.exit_code != 0
    assert "altered: digest mismatch" in result.output
    assert issubclass(ModelSignatureError, RegistryError)
