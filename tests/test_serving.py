"""The prediction service: RLE, predictor, HTTP API (TestClient and real uvicorn), CLI."""

from __future__ import annotations

import ast
import io
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from evidence import evaluated
from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.spec import ModelSpec
from imaging.volume import Volume
from registry import TrackingRun, default_store, load_model, publish_model
from registry.load import LoadedModel
from serving import (
    Predictor,
    ServingSettings,
    create_app,
    registry_loader,
    rle_decode,
    rle_encode,
    triage_score,
)
from serving.cli import serve

MODEL = "fedseg-unet-test"
URI = f"models:/{MODEL}@champion"
SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
SHAPE = (3, 40, 48)  # rows/cols differ from image_size and from each other


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fedseg_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry under a temporary FEDSEG_HOME holding one published tiny model (champion)."""
    home = tmp_path_factory.mktemp("fedseg_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSEG_HOME", str(home))
        mp.delenv("FEDSEG_MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for key in ("MODEL_URI", "HOST", "PORT", "MAX_UPLOAD_MB", "MAX_INSTANCES", "DEVICE", "AUTH"):
            mp.delenv(f"FEDSEG_SERVE_{key}", raising=False)
        torch.manual_seed(0)
        store = default_store()
        run = TrackingRun.start(store, "serving-tests", "publish", {})
        published = publish_model(
            store, run, MODEL, build_unet(SPEC).state_dict(), SPEC, {"dice_pooled": 0.5}, evaluated()
        )
        run.end(ok=True)
        assert published.promoted
        yield home


@pytest.fixture(scope="module")
def loaded(fedseg_home: Path) -> LoadedModel:
    return load_model(default_store(), URI)


@pytest.fixture(scope="module")
def settings(fedseg_home: Path) -> ServingSettings:
    return ServingSettings(model_uri=URI, device="cpu", auth="off")  # auth: test_serving_security


@pytest.fixture(scope="module")
def client(settings: ServingSettings, loaded: LoadedModel) -> Iterator[TestClient]:
    # the real registry loader, so the service loads from $FEDSEG_HOME like `fedseg serve`
    with TestClient(create_app(settings, loader=registry_loader)) as c:
        yield c


def _series(tmp: Path, seed: str, shape: tuple[int, int, int] = SHAPE) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    pixels = rng.integers(0, 1000, size=shape)
    pixels[:, 10:20, 12:24] += 2000  # a bright blob
    return write_series(
        tmp / seed, pixels, patient_id="P-TEST", patient_name="Test^Patient", uid_seed=seed,
        modality="MR", spacing=(2.0, 0.8, 0.8),
    )


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- RLE


@pytest.mark.parametrize(
    ("mask", "runs"),
    [
        (np.zeros((2, 3), np.uint8), [6]),
        (np.ones((2, 3), np.uint8), [0, 6]),
        (np.array([[1, 1, 0], [0, 1, 0]], np.uint8), [0, 2, 2, 1, 1]),
        (np.array([0, 0, 1, 1, 1, 0], bool), [2, 3, 1]),
        (np.array([0, 1], np.int64), [1, 1]),
        (np.zeros((0, 4), np.uint8), []),
    ],
)
def test_rle_known_masks(mask: np.ndarray, runs: list[int]) -> None:
    assert rle_encode(mask) == runs
    decoded = rle_decode(runs, mask.shape)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8))


def test_rle_round_trips_random_3d_masks() -> None:
    rng = np.random.default_rng(1)
    for p in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = (rng.random((4, 17, 23)) < p).astype(np.uint8)
        runs = rle_encode(mask)
        assert sum(runs) == mask.size and all(isinstance(r, int) and r >= 0 for r in runs)
        assert all(r > 0 for r in runs[1:])  # only the leading run of 0s may be empty
        np.testing.assert_array_equal(rle_decode(runs, mask.shape), mask)


def test_rle_uses_c_order() -> None:
    mask = np.zeros((2, 2), np.uint8)
    mask[0, 1] = 1
    assert rle_encode(mask) == [1, 1, 2]
    assert rle_encode(np.asfortranarray(mask)) == [1, 1, 2]


def test_rle_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="binary"):
        rle_encode(np.array([0, 2]))
    with pytest.raises(ValueError, match="sum to 5"):
        rle_decode([2, 3], (2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        rle_decode([-1, 7], (2, 3))


# ----------------------------------------------------------------------------- predictor


def test_triage_score_is_the_top_k_mean_of_the_worst_slice() -> None:
    probs = np.zeros((3, 4, 4), np.float32)
    probs[1, 0, :3] = 0.9  # 3 hot pixels: mean of top 4 = 0.675
    probs[2, 2, 2] = 1.0  # one hot pixel: mean of top 4 = 0.25
    score, per_slice = triage_score(probs, 4)
    assert score == pytest.approx(0.675)
    np.testing.assert_allclose(per_slice, [0.0, 0.675, 0.25], atol=1e-6)
    assert triage_score(probs, 1000)[0] == pytest.approx(2.7 / 16)  # k clamped to the slice size


def _biased(model: LoadedModel, bias: float) -> LoadedModel:
    """The model with its output conv silenced and biased: probabilities ~1 or ~0 everywhere."""
    state = {k: v.clone() for k, v in model.state_dict.items()}
    state["model.2.1.conv.unit0.conv.weight"].zero_()
    state["model.2.1.conv.unit0.conv.bias"].fill_(bias)
    return replace(model, state_dict=state)


def _volume(shape: tuple[int, int, int] = SHAPE) -> Volume:
    pixels = np.random.default_rng(2).random(shape, dtype=np.float32) * 100
    return Volume(pixels, (1.0, 1.0, 1.0), "1.2.3", "1.2", tuple(f"1.2.3.{i}" for i in range(shape[0])))


def test_predictor_mask_in_input_geometry_and_triage(loaded: LoadedModel) -> None:
    hot = Predictor(_biased(loaded, 40.0), device="cpu").predict(_volume())
    assert hot.mask.shape == SHAPE and hot.mask.dtype == np.uint8
    assert hot.mask.all() and hot.score > 0.99 and hot.status == "suspect"
    cold = Predictor(_biased(loaded, -40.0), device="cpu").predict(_volume())
    assert not cold.mask.any() and cold.score < 0.01 and cold.status == "normal"
    plain = Predictor(loaded, device="cpu").predict(_volume())
    assert 0.0 <= plain.score <= 1.0
    assert plain.status == ("suspect" if plain.score >= SPEC.triage_threshold else "normal")
    assert set(np.unique(plain.mask)) <= {0, 1}


def test_predictor_is_thread_safe(loaded: LoadedModel) -> None:
    predictor = Predictor(loaded, device="cpu")
    expected = predictor.predict(_volume())
    results: list[float] = []

    def work() -> None:
        results.append(predictor.predict(_volume()).score)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == pytest.approx([expected.score] * 6)


# ----------------------------------------------------------------------------- HTTP API


def _check_prediction(response: httpx.Response, loaded: LoadedModel, series_uid: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "model_name", "model_version", "series_instance_uid", "score", "status", "mask"
    }
    assert body["model_name"] == MODEL and body["model_version"] == loaded.version
    assert response.headers["X-Model-Version"] == str(loaded.version)
    assert body["series_instance_uid"] == series_uid
    assert 0.0 <= body["score"] <= 1.0
    assert body["status"] == ("suspect" if body["score"] >= SPEC.triage_threshold else "normal")
    mask = body["mask"]
    assert mask["shape"] == list(SHAPE) and mask["encoding"] == "rle"
    decoded = rle_decode(mask["rle"], mask["shape"])
    assert decoded.shape == SHAPE
    assert rle_encode(decoded) == mask["rle"]


def test_predict_returns_documented_json(
    client: TestClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    paths = _series(tmp_path, "one")
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    # files in reverse order: the reader sorts slices along the normal
    response = client.post("/v1/predict", files=_files(paths[::-1]))
    _check_prediction(response, loaded, series_uid)


def test_health(client: TestClient, loaded: LoadedModel) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready", "model_uri": URI, "model_name": MODEL, "model_version": loaded.version
    }


def test_not_ready_when_model_is_missing(fedseg_home: Path) -> None:
    settings = ServingSettings(model_uri="models:/nope@champion", device="cpu", auth="off")
    with TestClient(create_app(settings, loader=registry_loader)) as c:
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 503
        assert "models:/nope@champion is not in the registry" in ready.json()["detail"]
        predict = c.post("/v1/predict", files=[("files", ("a.dcm", b"x", "application/dicom"))])
        assert predict.status_code == 503
        assert "not ready" in predict.json()["detail"]


def test_not_ready_when_loader_crashes(fedseg_home: Path) -> None:
    def broken(uri: str) -> LoadedModel:
        raise OSError("disk on fire")

    with TestClient(create_app(ServingSettings(model_uri=URI), loader=broken)) as c:
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and "disk on fire" in ready.json()["detail"]


def test_not_ready_when_weights_do_not_fit_the_spec(loaded: LoadedModel) -> None:
    wrong = replace(loaded, spec=ModelSpec(channels=(8, 16), image_size=32))
    with TestClient(create_app(ServingSettings(model_uri=URI), loader=lambda uri: wrong)) as c:
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and "do not match the model spec" in ready.json()["detail"]


def test_not_dicom_is_415_naming_the_file(client: TestClient, tmp_path: Path) -> None:
    files = _files(_series(tmp_path, "nd", (1, 40, 48)))
    files.append(("files", ("notes.txt", b"hello, not an image", "text/plain")))
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 415
    assert "notes.txt" in response.json()["detail"] and "not a DICOM" in response.json()["detail"]
    empty = client.post("/v1/predict", files=[("files", ("empty.dcm", b"", "application/dicom"))])
    assert empty.status_code == 415 and "empty.dcm" in empty.json()["detail"]


def test_dicom_without_pixel_data_is_422(client: TestClient, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_series(tmp_path, "np", (1, 40, 48))[0])
    del ds.PixelData
    response = client.post(
        "/v1/predict", files=[("files", ("nopixels.dcm", _bytes(ds), "application/dicom"))]
    )
    assert response.status_code == 422
    assert "nopixels.dcm has no pixel data" in response.json()["detail"]


def test_two_series_is_422(client: TestClient, tmp_path: Path) -> None:
    files = _files(_series(tmp_path, "a", (2, 40, 48))) + _files(_series(tmp_path, "b", (2, 40, 48)))
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 422
    assert "found 2 series" in response.json()["detail"]


def test_no_files_is_422(client: TestClient) -> None:
    response = client.post("/v1/predict", data={"other": "x"}, files=[("note", ("n.txt", b"1"))])
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "no files" in detail and "'files'" in detail and "'note'" in detail


def test_not_multipart_is_415(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"files": []})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_unsupported_transfer_syntax_is_415_naming_it(client: TestClient, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_series(tmp_path, "ts", (1, 40, 48))[0])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    response = client.post(
        "/v1/predict", files=[("files", ("mpeg.dcm", _bytes(ds), "application/dicom"))]
    )
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "mpeg.dcm" in detail and MPEG2MPML in detail


def test_limits_are_413(fedseg_home: Path, loaded: LoadedModel, tmp_path: Path) -> None:
    settings = ServingSettings(model_uri=URI, max_instances=2, max_upload_mb=1, device="cpu", auth="off")
    with TestClient(create_app(settings, loader=lambda uri: loaded)) as c:
        many = c.post("/v1/predict", files=_files(_series(tmp_path, "many", (3, 8, 8))))
        assert many.status_code == 413 and "MAX_INSTANCES" in many.json()["detail"]
        big = c.post(
            "/v1/predict", files=[("files", ("big.dcm", b"\0" * (1024 * 1024 + 1), "application/dicom"))]
        )
        assert big.status_code == 413 and "MAX_UPLOAD_MB" in big.json()["detail"]


@pytest.mark.slow
def test_real_uvicorn_over_http(
    settings: ServingSettings, loaded: LoadedModel, tmp_path: Path
) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, loader=registry_loader), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        paths = _series(tmp_path, "http")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/health/ready").status_code == 200
            response = http.post("/v1/predict", files=_files(paths))
            _check_prediction(response, loaded, str(pydicom.dcmread(paths[0]).SeriesInstanceUID))
            assert http.post("/v1/predict", files=[("files", ("x.bin", b"junk"))]).status_code == 415
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


# ----------------------------------------------------------------------------- settings and CLI


def test_settings_read_env_and_refuse_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSEG_SERVE_MODEL_URI", "models:/m/3")
    monkeypatch.setenv("FEDSEG_SERVE_PORT", "9000")
    s = ServingSettings()
    assert (s.model_uri, s.port, s.host) == ("models:/m/3", 9000, "127.0.0.1")
    assert s.auth == "apikey"  # auth is on unless turned off
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        ServingSettings(model_uri="m@champion")
    with pytest.raises(ValueError, match="port"):
        ServingSettings(port=70000)
    with pytest.raises(ValueError, match="max_upload_mb"):
        ServingSettings(max_upload_mb=0)


def test_cli_refuses_a_model_absent_from_the_registry(fedseg_home: Path) -> None:
    result = CliRunner().invoke(serve, ["--model", "models:/nope@champion", "--port", "1"])
    assert result.exit_code != 0
    assert "models:/nope@champion is not in the registry" in result.output


def test_cli_refuses_a_malformed_uri(fedseg_home: Path) -> None:
    result = CliRunner().invoke(serve, ["--model", "nope"])
    assert result.exit_code != 0
    assert "model_uri" in result.output and "models:/NAME@ALIAS" in result.output


def test_serving_imports_only_what_the_design_allows() -> None:
    forbidden = {
        "flwr", "opacus", "mlflow", "privacy", "aggregation", "client", "server", "simulation",
        "fedseg",
    }
    root = Path(__file__).resolve().parents[1] / "serving"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
