"""``POST /v2/models/{name}/infer``: Open Inference Protocol inference on preprocessed slices, and
the one forward thread every model's forward runs on.

A real app (in-memory registry loader) serves a tiny U-Net; the answers are compared with the
same network's forward in this process.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from serving_fixtures import URI, bearer, new_key, parts, tiny_model, write_tiny_series

import serving.predictor as predictor_module
from imaging.model import load_state_dict
from imaging.training import predict_probabilities
from registry.load import LoadedModel
from serving import ServingSettings, create_app
from serving.models import canary_bucket

NAME = "sec"
SIZE = 32  # serving_fixtures.SPEC.image_size
INFER = f"/v2/models/{NAME}/infer"
CHALLENGER_URI = "models:/sec@challenger"


def _slices(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, SIZE, SIZE), dtype=np.float32)


def _expected(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    net = load_state_dict(model.spec, model.state_dict).eval()
    with torch.inference_mode():
        return predict_probabilities(net, x[:, 0], device=torch.device("cpu"))[:, None]


def _json_body(x: np.ndarray, **extra: object) -> dict:
    tensor = {"name": "slices", "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def _binary_body(x: np.ndarray, *, binary_output: bool = True, datatype: str = "FP32",
                 **extra: object) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [{"name": "slices", "shape": list(x.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": binary_output}, **extra,
    }
    head = json.dumps(header).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def _binary_output(response) -> tuple[dict, np.ndarray]:  # type: ignore[no-untyped-def]
    n = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:n])
    out = header["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(response.content) - n
    return header, np.frombuffer(response.content[n:], "<f4").reshape(out["shape"])


def _app(models: dict[str, LoadedModel], **settings: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {"model_uri": URI, "device": "cpu", "auth": "off",
                               "reload_seconds": 0}
    return create_app(ServingSettings(**{**base, **settings}), loader=lambda uri: models[uri])


@pytest.fixture
def champion() -> LoadedModel:
    return tiny_model(version=7)


@pytest.fixture
def client(champion: LoadedModel):  # type: ignore[no-untyped-def]
    with TestClient(_app({URI: champion}, max_instances=8)) as c:
        yield c


def test_json_and_binary_answer_the_models_own_forward(client: TestClient,
                                                       champion: LoadedModel) -> None:
    x = _slices()
    expected = _expected(champion, x)

    r = client.post(INFER, json=_json_body(x, id="req-1"))
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "7" and r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-1", NAME, "7")
    out = body["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [3, 1, SIZE, SIZE])
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                               expected, atol=1e-6)

    data, headers = _binary_body(x)
    r = client.post(INFER, content=data, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header, probs = _binary_output(r)
    assert header["model_version"] == "7" and "id" not in header
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    # binary in, JSON out; FP64 in (converted); nested JSON data
    data, headers = _binary_body(x, binary_output=False)
    r = client.post(INFER, content=data, headers=headers)
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(x.shape),
                               expected, atol=1e-6)
    data, headers = _binary_body(x.astype(np.float64), datatype="FP64")
    np.testing.assert_allclose(_binary_output(client.post(INFER, content=data, headers=headers))[1],
                               expected, atol=1e-6)
    nested = {"inputs": [{"name": "slices", "shape": list(x.shape), "datatype": "FP32",
                          "data": x.tolist()}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    np.testing.assert_allclose(_binary_output(client.post(INFER, json=nested))[1], expected,
                               atol=1e-6)
    # the forward's time in a Server-Timing header
    assert re.fullmatch(r"forward;dur=\d+\.\d\d", r.headers["Server-Timing"])
    # the versioned path of the served version
    r = client.post(f"/v2/models/{NAME}/versions/7/infer", json=_json_body(x))
    assert r.status_code == 200 and r.json()["model_version"] == "7"


def _tensor(**changes: object) -> dict:
    tensor: dict[str, object] = {"name": "slices", "shape": [1, 1, SIZE, SIZE], "datatype": "FP32",
                                 "data": [0.5] * SIZE * SIZE}
    tensor.update(changes)
    return {"inputs": [tensor]}


@pytest.mark.robustness
@pytest.mark.parametrize(("body", "status", "says"), [
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"inputs": []}).encode(), 400, "exactly one input"),
    (json.dumps(_tensor(name="image")).encode(), 422, "unknown input 'image'"),
    (json.dumps(_tensor(datatype="INT8")).encode(), 422, "datatype 'INT8'"),
    (json.dumps(_tensor(shape=[1, SIZE, SIZE])).encode(), 422, f"is not [n, 1, {SIZE}, {SIZE}]"),
    (json.dumps(_tensor(shape=[1, 1, 16, 16])).encode(), 422, f"is not [n, 1, {SIZE}, {SIZE}]"),
    (json.dumps(_tensor(shape=[0, 1, SIZE, SIZE], data=[])).encode(), 422, "between 1 and 8"),
    (json.dumps(_tensor(shape=[9, 1, SIZE, SIZE])).encode(), 422, "between 1 and 8"),
    (json.dumps(_tensor(shape=[1, 1, SIZE, "x"])).encode(), 400, "non-negative integers"),
    (json.dumps(_tensor(data=[0.5] * 10)).encode(), 422, "holds 10 values"),
    (json.dumps(_tensor(data=["a"] * SIZE * SIZE)).encode(), 400, "must be numbers"),
    (json.dumps(_tensor(data=None)).encode(), 400, "must be numbers"),
    (json.dumps(_tensor(data=[float("nan")] * SIZE * SIZE)).encode(), 400, "not valid JSON"),
    (json.dumps(_tensor(data=[1e300] * SIZE * SIZE)).encode(), 422, "NaN or infinite"),
    (json.dumps({**_tensor(), "outputs": [{"name": "mask"}]}).encode(), 422, "unknown output"),
    (json.dumps({**_tensor(), "parameters": [1]}).encode(), 400, "parameters must be an object"),
])
def test_bad_requests_are_4xx_naming_the_problem(client: TestClient, body: bytes, status: int,
                                                 says: str) -> None:
    r = client.post(INFER, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


@pytest.mark.robustness
def test_bad_binary_framing_is_refused(client: TestClient) -> None:
    x = _slices(1)
    data, headers = _binary_body(x)
    n = int(headers["Inference-Header-Content-Length"])
    cases = [
        (data, {**headers, "Inference-Header-Content-Length": "abc"}, 400, "must be an integer"),
        (data, {**headers, "Inference-Header-Content-Length": str(len(data) + 1)}, 400,
         "does not fit the body"),
        (data[:-4], headers, 400, "runs past the end of the body"),
        (data + b"\0" * 8, headers, 400, "8 bytes follow the inputs' binary data"),
        (data[:n] + np.full(x.size, np.nan, np.float32).tobytes(), headers, 422, "NaN or infinite"),
        (data[:n].replace(str(x.nbytes).encode(), str(x.nbytes - 4).encode()) + data[n:-4],
         {**headers, "Inference-Header-Content-Length": str(n)}, 422, "is not shape x 4 bytes"),
    ]
    for body, hdrs, status, says in cases:
        r = client.post(INFER, content=body, headers=hdrs)
        assert r.status_code == status and says in r.json()["detail"], (says, r.text)


def test_unknown_model_or_version_is_404_and_no_model_503(champion: LoadedModel) -> None:
    x = _slices(1)
    with TestClient(_app({URI: champion})) as client:
        r = client.post("/v2/models/other/infer", json=_json_body(x))
        assert r.status_code == 404 and "'other' is not served here" in r.json()["detail"]
        r = client.post(f"/v2/models/{NAME}/versions/8/infer", json=_json_body(x))
        assert r.status_code == 404 and "version 8 is not being served" in r.json()["detail"]

    def failing(uri: str) -> LoadedModel:
        raise OSError("registry down")

    with TestClient(create_app(ServingSettings(model_uri=URI, device="cpu", auth="off",
                                               reload_seconds=0), loader=failing)) as client:
        r = client.post(INFER, json=_json_body(x))
        assert r.status_code == 503 and "not ready" in r.json()["detail"]


def test_challenger_by_version_and_by_canary_study(champion: LoadedModel) -> None:
    challenger = tiny_model(version=8)
    torch.manual_seed(1)
    with torch.no_grad():  # other weights than the champion's
        challenger = LoadedModel(name=NAME, version=8, spec=challenger.spec, state_dict={
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in challenger.state_dict.items()})
    x = _slices(2)
    uids = [f"1.2.826.0.1.3680043.8.498.5.{i}" for i in range(100)]
    canary = next(u for u in uids if canary_bucket(u) < 0.5)
    plain = next(u for u in uids if canary_bucket(u) >= 0.5)
    app = _app({URI: champion, CHALLENGER_URI: challenger}, canary_share=0.5,
               challenger_uri=CHALLENGER_URI)
    with TestClient(app) as client:
        by_version = client.post(f"/v2/models/{NAME}/versions/8/infer", json=_json_body(x))
        assert by_version.status_code == 200 and by_version.headers["X-Model-Version"] == "8"
        np.testing.assert_allclose(
            np.asarray(by_version.json()["outputs"][0]["data"]).reshape(x.shape),
            _expected(challenger, x), atol=1e-6)

        def version(study: str | None) -> str:
            extra = {} if study is None else {"parameters": {"study_instance_uid": study}}
            r = client.post(INFER, json=_json_body(x, **extra))
            assert r.status_code == 200, r.text
            return r.json()["model_version"]

        assert [version(canary) for _ in range(3)] == ["8"] * 3  # sticky
        assert [version(plain), version(None)] == ["7", "7"]


def test_infer_needs_the_predict_scope(champion: LoadedModel) -> None:
    with TestClient(_app({URI: champion}, auth="apikey")) as client:
        body = _json_body(_slices(1))
        assert client.post(INFER, json=body).status_code == 401
        monitor = client.post(INFER, json=body, headers=bearer(new_key("mon", "monitor")))
        assert monitor.status_code == 403 and "'predict'" in monitor.json()["detail"]
        ok = client.post(f"/v2/models/{NAME}/versions/7/infer", json=body,
                         headers=bearer(new_key("app", "predict")))
        assert ok.status_code == 200
        metrics = client.get("/metrics", headers=bearer(new_key("prom", "monitor"))).text
        assert ('fedseg_requests_total{method="POST",route="/v2/models/{name}/versions/{version}'
                '/infer",status="200",version="7"} 1.0') in metrics


def test_every_forward_runs_on_the_one_forward_thread(
    champion: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One OpenMP team: the champion's and the challenger's forwards, from /v1/predict and from
    /v2 infer, concurrent or not, all run on the app's one forward thread."""
    threads: list[int] = []
    real = predictor_module.predict_probabilities

    def recording(net, images, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        return real(net, images, **kwargs)

    monkeypatch.setattr(predictor_module, "predict_probabilities", recording)
    challenger = LoadedModel(name=NAME, version=8, spec=champion.spec, state_dict=champion.state_dict)
    app = _app({URI: champion, CHALLENGER_URI: challenger}, canary_share=0.5,
               challenger_uri=CHALLENGER_URI)
    series = parts(write_tiny_series(tmp_path, "forward-thread"))
    with TestClient(app) as client:
        assert len(threads) == 2  # the two warm-ups

        def send(i: int) -> None:
            if i % 2:
                assert client.post("/v1/predict", files=series).status_code == 200
            else:
                r = client.post(f"/v2/models/{NAME}/versions/{7 + i % 4 // 2}/infer",
                                json=_json_body(_slices(1)))
                assert r.status_code == 200

        workers = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
    assert len(threads) >= 4 and len(set(threads)) == 1
    assert threads[0] not in {threading.get_ident(), *(w.ident for w in workers)}


def test_dicom_routes_time_their_stages(client: TestClient, tmp_path: Path) -> None:
    series = parts(write_tiny_series(tmp_path, "timing"))
    for route in ("/v1/predict", "/v1/triage"):
        r = client.post(route, files=series)
        assert r.status_code == 200, r.text
        stages = dict(item.split(";dur=") for item in r.headers["Server-Timing"].split(", "))
        assert list(stages) == ["read", "preprocess", "forward", "postprocess"]
        assert all(float(ms) > 0 for ms in stages.values())
