"""The served U-Net compiled with ``torch.compile`` (``FEDSEG_SERVE_COMPILE``, on by default).

Real TorchInductor compilations (this machine's g++): the compiled forward answers as the eager
one, the warm-up leaves nothing to compile while serving, and a compiler that cannot run leaves
the eager network serving with the reason shown. The rest of the suite serves eagerly
(tests/conftest.py) to save the compile time.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from deployment_harness import free_port
from fastapi.testclient import TestClient

from evidence import evaluated
from imaging.model import build_unet, load_state_dict
from imaging.spec import ModelSpec
from imaging.training import predict_probabilities
from registry import TrackingRun, default_store, publish_model
from registry.load import LoadedModel
from serving import ServingSettings, create_app
from serving.compiled import CompiledNet, compile_for_inference, warm_batch_sizes
from serving.predictor import Predictor

pytestmark = pytest.mark.slow
#: TorchInductor compiles C++ on the CPU; where no compiler is, only the fallback can be tested
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="no C++ compiler: torch.compile cannot run here")

URI = "models:/demo@champion"
SPEC = ModelSpec()  # the default spec: what `make demo` trains and serves


def _model(spec: ModelSpec = SPEC, version: int = 3, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(name="demo", version=version, spec=spec, state_dict=build_unet(spec).state_dict())


def _eager(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    net = load_state_dict(model.spec, model.state_dict).eval()
    with torch.inference_mode():
        return predict_probabilities(net, images, device=torch.device("cpu"))


def _slices(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def test_warm_up_covers_each_batch_shape_class() -> None:
    assert warm_batch_sizes(32) == (1, 2, 16, 32)
    assert warm_batch_sizes(8) == (1, 2, 8)
    assert warm_batch_sizes(1) == (1,)


@needs_cxx
def test_compiled_forward_answers_as_the_eager_one_and_never_compiles_while_serving() -> None:
    model = _model()
    predictor = Predictor(model, device="cpu", compile_forward=True)
    assert (predictor.forward_mode, predictor.forward_detail) == ("compiled", "")
    assert isinstance(predictor._net, CompiledNet)
    size = SPEC.image_size
    # every batch size a request can bring, including several forwards of batch_size (32)
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (1, 2, 3, 15, 16, 17, 31, 32, 33, 40, 64):
            x = _slices(n, size, seed=n)
            got = predictor._runner.submit(predictor._forward, x).result()
            np.testing.assert_allclose(got, _eager(model, x), atol=1e-4, err_msg=f"{n} slices")
    # another version of the same architecture reuses the graphs, with its own weights
    other = _model(version=4, seed=1)
    second = Predictor(other, device="cpu", compile_forward=True)
    x = _slices(5, size)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = second._runner.submit(second._forward, x).result()
    np.testing.assert_allclose(got, _eager(other, x), atol=1e-4)
    assert np.abs(got - _eager(model, x)).max() > 1e-3


@needs_cxx
def test_the_service_serves_compiled_and_says_so() -> None:
    model = _model()
    settings = ServingSettings(model_uri=URI, device="cpu", auth="off", reload_seconds=0, compile=True)
    x = _slices(3, SPEC.image_size)[:, None]
    body = {"inputs": [{"name": "slices", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    with TestClient(create_app(settings, loader=lambda uri: model)) as client:
        served = client.get("/v2/models/demo").json()["served"][0]
        assert (served["forward"], served["forward_detail"]) == ("compiled", "")
        r = client.post("/v2/models/demo/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got[:, 0], _eager(model, x[:, 0]), atol=1e-4)


def test_without_a_compiler_the_eager_network_serves_and_the_reason_is_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # an architecture no other test compiles, and an empty compile cache: the C++ compiler must run
    spec = ModelSpec(channels=(6, 12), image_size=24)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    model = _model(spec)
    settings = ServingSettings(model_uri=URI, device="cpu", auth="off", reload_seconds=0, compile=True)
    x = _slices(2, spec.image_size)[:, None]
    body = {"inputs": [{"name": "slices", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    with caplog.at_level(logging.WARNING, logger="serving.compiled"):
        with TestClient(create_app(settings, loader=lambda uri: model)) as client:
            served = client.get("/v2/models/demo").json()["served"][0]
            r = client.post("/v2/models/demo/infer", json=body)
    assert served["ready"] and served["forward"] == "eager"
    assert "torch.compile failed" in served["forward_detail"]
    assert "Cxx" in served["forward_detail"] or "compiler" in served["forward_detail"].lower()
    assert any("torch.compile failed" in m for m in caplog.messages)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got[:, 0], _eager(model, x[:, 0]), atol=1e-5)


def test_a_failing_backend_leaves_the_network_eager() -> None:
    net = build_unet(ModelSpec(channels=(4, 8), image_size=16)).eval()

    def broken(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> None:
        raise RuntimeError("backend exploded")

    def warm(compiled: torch.nn.Module) -> None:
        with torch.inference_mode():
            compiled(torch.zeros(1, 1, 16, 16))

    result = compile_for_inference(net, warm, backend=broken)
    assert result.net is net and result.mode == "eager"
    assert "backend exploded" in result.detail


@needs_cxx
def test_fedseg_serve_compiles_into_a_cache_under_its_home(fedseg_home: Path) -> None:
    """The real command: `fedseg serve --compile` says it compiles, serves compiled, and keeps
    the compiled kernels under $FEDSEG_HOME/cache/torchinductor (a restart reuses them)."""
    spec = ModelSpec(channels=(4, 8), image_size=32)
    store = default_store()
    run = TrackingRun.start(store, "compile-tests", "publish", {})
    torch.manual_seed(0)
    publish_model(store, run, "tiny", build_unet(spec).state_dict(), spec, {"dice_pooled": 0.5}, evaluated())
    run.end(ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(FEDSEG_HOME=str(fedseg_home), FEDSEG_SERVE_COMPILE="false")  # the flag wins
    log = fedseg_home / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedseg.cli", "serve", "--model", "models:/tiny@champion",
             "--port", str(port), "--auth", "off", "--compile"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready: " + log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        served = httpx.get(f"http://127.0.0.1:{port}/v2/models/tiny", timeout=10).json()["served"][0]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert served["forward"] == "compiled", served
    assert "compiling the forward (torch.compile)" in log.read_text()
    cache = fedseg_home / "cache" / "torchinductor"
    assert cache.is_dir() and any(cache.rglob("*.so")), "no compiled kernel under the home's cache"
