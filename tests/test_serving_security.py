"""Who may call the service: API keys (CLI, hashed store), JWTs, scopes, body limit, audit lines."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path

import jwt
import pydicom
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from serving.cli import serve
from serving.errors import AuthConfigError
from serving.security import AUDIT_LOGGER, ApiKeyStore, authenticator_for, required_scope
from serving.security.middleware import BodyLimitMiddleware
from serving.settings import ServingSettings as Settings
from tests.serving_fixtures import (
    PATIENT_ID,
    PATIENT_NAME,
    bearer,
    make_app,
    new_key,
    parts,
    write_tiny_series,
)

ISSUER, AUDIENCE = "https://idp.hospital.example", "fedseg"


@pytest.fixture
def client() -> TestClient:
    with TestClient(make_app(auth="apikey")) as c:
        yield c


# ----------------------------------------------------------------------------- API keys


def test_cli_creates_a_key_once_and_stores_only_its_hash(fedseg_home: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(serve, ["apikey", "create", "ris-prod", "--scopes", "predict,monitor"])
    assert created.exit_code == 0, created.output
    (key,) = created.stdout.strip().splitlines()  # only the key on stdout: $(fedseg serve apikey create ...)
    assert key.startswith("fsk_") and len(key) > 40
    stored = (fedseg_home / "serving" / "apikeys.json").read_text()
    secret = key.split("_", 2)[2]
    assert secret not in stored and key not in stored
    assert (fedseg_home / "serving" / "apikeys.json").stat().st_mode & 0o077 == 0
    record = json.loads(stored)["keys"][0]
    assert record["name"] == "ris-prod" and record["scopes"] == ["predict", "monitor"]
    assert len(record["hash"]) == 64 and len(record["salt"]) == 32

    listed = runner.invoke(serve, ["apikey", "list", "--json"])
    assert listed.exit_code == 0 and secret not in listed.output
    assert json.loads(listed.stdout.splitlines()[0])["name"] == "ris-prod"
    again = runner.invoke(serve, ["apikey", "create", "ris-prod"])
    assert again.exit_code != 0 and "exists" in again.output
    bad = runner.invoke(serve, ["apikey", "create", "x", "--scopes", "predict,root"])
    assert bad.exit_code != 0 and "unknown scope(s) root" in bad.output

    assert ApiKeyStore().verify(key).name == "ris-prod"
    assert ApiKeyStore().verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    revoked = runner.invoke(serve, ["apikey", "revoke", "ris-prod"])
    assert revoked.exit_code == 0, revoked.output
    assert ApiKeyStore().verify(key) is None
    assert "revoked" in runner.invoke(serve, ["apikey", "list"]).output


def test_same_secret_hashes_differently_per_key() -> None:
    store = ApiKeyStore()
    store.create("a", "predict")
    store.create("b", "predict")
    a, b = store.list()
    assert a.salt != b.salt and a.hash != b.hash


# ----------------------------------------------------------------------------- auth matrix


@pytest.mark.adversarial
def test_no_or_bad_credentials_are_401_with_a_challenge(client: TestClient) -> None:
    none = client.post("/v1/predict")
    assert none.status_code == 401
    assert none.headers["www-authenticate"] == 'Bearer realm="fedseg"'
    assert "Authorization: Bearer" in none.json()["detail"]
    for header in ("Bearer fsk_000000000000_notarealkeynotarealkey", "Basic dXNlcjpwdw==", "Bearer ",
                   "Bearer not-even-a-key"):
        bad = client.get("/v1/drift", headers={"Authorization": header})
        assert bad.status_code == 401, header
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]


@pytest.mark.adversarial
def test_scopes_decide_what_a_key_may_call(client: TestClient, tmp_path: Path) -> None:
    predict, monitor, admin = (new_key(n, n) for n in ("predict", "monitor", "admin"))
    series = parts(write_tiny_series(tmp_path, "scopes"))
    ok = client.post("/v1/predict", files=series, headers=bearer(predict))
    assert ok.status_code == 200, ok.text
    assert ok.json()["model_version"] == 7

    denied = client.get("/v1/drift", headers=bearer(predict))
    assert denied.status_code == 403
    assert 'error="insufficient_scope", scope="monitor"' in denied.headers["www-authenticate"]
    assert "predict lacks the scope 'monitor'" in denied.json()["detail"]
    assert client.get("/metrics", headers=bearer(predict)).status_code == 403
    assert client.post("/v1/predict", files=series, headers=bearer(monitor)).status_code == 403

    assert client.get("/v1/drift", headers=bearer(monitor)).status_code == 200
    assert client.get("/metrics", headers=bearer(monitor)).status_code == 200
    assert client.get("/v1/drift", headers=bearer(admin)).status_code == 200
    assert client.post("/v1/predict", files=series, headers=bearer(admin)).status_code == 200
    # a path no rule names needs admin: 401/403 hide it, admin learns it does not exist
    assert client.get("/v1/secret-admin-thing").status_code == 401
    assert client.get("/v1/secret-admin-thing", headers=bearer(predict)).status_code == 403
    assert client.get("/v1/secret-admin-thing", headers=bearer(admin)).status_code == 404


def test_open_paths_need_no_key(client: TestClient) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    body = schema.json()
    assert body["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert body["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": ["predict"]}]
    assert "401" in body["paths"]["/v1/predict"]["post"]["responses"]
    assert "security" not in body["paths"]["/health/live"]["get"]
    assert client.get("/docs").status_code == 200


def test_revoked_key_is_refused_by_a_running_service(client: TestClient) -> None:
    key = new_key("temp", "monitor")
    assert client.get("/v1/drift", headers=bearer(key)).status_code == 200
    ApiKeyStore().revoke("temp")
    assert client.get("/v1/drift", headers=bearer(key)).status_code == 401


def test_policy_maps_paths_to_scopes() -> None:
    assert required_scope("/v1/jobs/abc") == "predict"
    assert required_scope("/v1/triage") == "predict"
    assert required_scope("/v2/models/fedseg-unet") == "monitor"
    assert required_scope("/v2/models/fedseg-unet/infer") == "predict"
    assert required_scope("/v2/models/fedseg-unet/versions/3/infer") == "predict"
    assert required_scope("/v2/models/fedseg-unet/versions/3") == "monitor"
    assert required_scope("/v2/health/ready") is None
    assert required_scope("/ui") is None
    assert required_scope("/v1/predictions") == "admin"  # a prefix only matches whole segments
    assert required_scope("/healthz") == "admin"


# ----------------------------------------------------------------------------- JWT


def _pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _token(private: object, alg: str = "RS256", *, kid: str | None = None, **claims: object) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "dr-lee", "exp": int(time.time()) + 300,
            "scope": "predict monitor", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def _hs256_with(secret: bytes) -> str:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60,
              "scope": "monitor"}
    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    return (signing + b"." + b64(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


def _jwt_app(key_file: Path, auth: str = "jwt") -> TestClient:
    return TestClient(make_app(auth=auth, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_key_file=key_file))


def test_jwt_from_a_pem_key(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "idp.pem"
    pem.write_bytes(_pem(private))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with _jwt_app(pem) as c:
        assert c.get("/v1/drift", headers=bearer(_token(private))).status_code == 200
        only_predict = _token(private, scope=None, scp=["predict"])
        assert c.get("/v1/drift", headers=bearer(only_predict)).status_code == 403
        for bad in (
            _token(other),  # signed by someone else
            _token(private, aud="another-service"),
            _token(private, iss="https://evil.example"),
            _token(private, exp=int(time.time()) - 3600),
            _token(private, sub=None),
            _hs256_with(_pem(private)),  # algorithm confusion: the public key as an HMAC secret
            "a.b.c",
        ):
            r = c.get("/v1/drift", headers=bearer(bad))
            assert r.status_code == 401, bad
            assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_jwt_from_a_jwks_with_es256_and_api_keys_beside(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}))
    key = new_key("pacs-bridge", "monitor")
    with _jwt_app(jwks, auth="apikey,jwt") as c:
        assert c.get("/v1/drift", headers=bearer(_token(private, "ES256", kid="k1"))).status_code == 200
        assert c.get("/v1/drift", headers=bearer(_token(private, "ES256", kid="k9"))).status_code == 401
        assert c.get("/v1/drift", headers=bearer(key)).status_code == 200


def test_settings_refuse_unsafe_auth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FEDSEG_SERVE_JWT_KEY_FILE"):
        Settings(auth="jwt", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    with pytest.raises(ValueError, match="only allowed on a loopback host"):
        Settings(auth="off", host="0.0.0.0")
    with pytest.raises(ValueError, match="auth must be"):
        Settings(auth="password")
    assert Settings(auth="jwt+apikey", jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                    jwt_key_file=tmp_path / "k.pem").auth == "apikey,jwt"
    assert Settings(host="0.0.0.0", auth="apikey").auth_methods == ("apikey",)
    assert Settings().auth == "apikey"  # on by default


def test_cli_refuses_an_unknown_auth_method() -> None:
    result = CliRunner().invoke(serve, ["--auth", "password"])
    assert result.exit_code != 0 and "auth must be 'apikey', 'jwt'" in result.output


def test_unusable_jwt_keys_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read the JWT key file"):
        authenticator_for(Settings(auth="jwt", jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                                   jwt_key_file=tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(AuthConfigError, match="neither a PEM public key nor a JWKS"):
        authenticator_for(Settings(auth="jwt", jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                                   jwt_key_file=bad))


# ----------------------------------------------------------------------------- body limit


@pytest.mark.adversarial
def test_content_length_over_the_limit_is_413_without_reading() -> None:
    key = new_key("big", "predict")
    big = b"\0" * (1024 * 1024 + 1)
    with TestClient(make_app(auth="apikey", max_upload_mb=1)) as c:
        r = c.post("/v1/predict", files=[("files", ("big.dcm", big, "application/dicom"))],
                   headers=bearer(key))
        assert r.status_code == 413 and "MAX_UPLOAD_MB" in r.json()["detail"]

    reads: list[int] = []

    async def receive() -> dict:
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def never(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("the app must not be called")

    middleware = BodyLimitMiddleware(never, max_bytes=100)
    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(b"content-length", b"101")]}
    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []


def test_chunked_body_is_cut_off_past_the_limit() -> None:
    key = new_key("chunky", "predict")
    app = make_app(auth="apikey", max_upload_mb=1)
    chunk = b"-" * (256 * 1024)
    reads: list[int] = []

    async def run() -> list[dict]:
        boundary = b"xyz"
        head = (b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.dcm\"\r\n"
                b"Content-Type: application/dicom\r\n\r\n")
        messages = [head] + [chunk] * 40  # 10 MiB without a Content-Length

        async def receive() -> dict:
            reads.append(1)
            if len(reads) > len(messages):
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": messages[len(reads) - 1],
                    "more_body": len(reads) < len(messages)}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
                 "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary),
                             (b"transfer-encoding", b"chunked"), (b"authorization", f"Bearer {key}".encode())]}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413, body
    assert b"MAX_UPLOAD_MB" in body
    assert len(reads) <= 6  # stopped after about 1 MiB of the 10 MiB


# ----------------------------------------------------------------------------- audit


def test_one_audit_line_per_request_without_phi(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key("ris", "predict")
    paths = write_tiny_series(tmp_path, "audit")
    ds = pydicom.dcmread(paths[0])
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        assert client.post("/v1/predict", files=parts(paths), headers=bearer(key)).status_code == 200
        assert client.post("/v1/predict", files=parts(paths), headers=bearer(key)).status_code == 200
        assert client.get("/v1/drift").status_code == 401
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(lines) == 3
    first, second, refused = lines
    assert first["principal"] == "ris" and first["auth"] == "apikey"
    assert first["route"] == "/v1/predict" and first["method"] == "POST" and first["status"] == 200
    assert first["model_version"] == 7 and first["bytes_in"] > 1000 and first["bytes_out"] > 0
    assert first["duration_ms"] >= 0 and first["time"].endswith("+00:00")
    assert first["study"] and first["study"] == second["study"]  # a stable pseudonym
    assert refused["status"] == 401 and refused["principal"] is None and refused["study"] is None
    assert refused["route"] == "/v1/drift"  # refused before routing: the policy's prefix
    text = caplog.text
    for phi in (PATIENT_NAME, PATIENT_ID, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID), key):
        assert phi not in text
