"""The web page at /ui, driven in headless Chromium over the DevTools protocol against real uvicorn.

A series written by pydicom is chosen in the page's file input, sent with the page's button, and
the canvas is read back: the red overlay must be exactly the mask the API returns for that slice,
drawn over the slice's own pixels, and the triage score must be shown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from imaging.dicom_read import read_series
from imaging.dicom_write import write_series
from imaging.model import build_unet, load_state_dict
from imaging.preprocess import preprocess_image, restore_probabilities
from imaging.spec import ModelSpec
from imaging.training import predict_probabilities
from registry.load import LoadedModel
from serving import ServingSettings, create_app, rle_decode

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (  # offline-safe headless flags (see the machine notes)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--remote-allow-origins=*",
)
SHAPE = (3, 40, 48)


class DevTools:
    """The few Chrome DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(url, max_size=None, open_timeout=20)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # skip events until our answer
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, limit_s: float = 30.0) -> Any:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {limit_s} s")

    def close(self) -> None:
        self._ws.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _series(tmp: Path) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(b"ui"))
    pixels = rng.integers(0, 1000, size=SHAPE)
    pixels[:, 10:20, 12:24] += 2000
    return write_series(tmp / "series", pixels, patient_id="P-UI", patient_name="Test^Patient",
                        uid_seed="ui", modality="MR", spacing=(2.0, 0.8, 0.8))


def _model(paths: list[Path]) -> LoadedModel:
    """A tiny untrained U-Net whose mask threshold is the median probability on this series,
    so that the mask covers part of each slice (an overlay that can be told from no overlay)."""
    torch.manual_seed(0)
    spec = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
    state = build_unet(spec).state_dict()
    volume = read_series(paths)
    net = load_state_dict(spec, state).eval()
    with torch.inference_mode():
        probs = predict_probabilities(net, preprocess_image(volume.pixels, spec), device=torch.device("cpu"))
    probs = restore_probabilities(probs, SHAPE[1], SHAPE[2])
    spec = dataclasses.replace(spec, threshold=float(np.median(probs)))
    return LoadedModel(name="fedseg-ui", version=5, spec=spec, state_dict=state)


class Service:
    """uvicorn serving the app in a thread on a free loopback port."""

    def __init__(self, model: LoadedModel, **settings: object) -> None:
        self.port = _free_port()
        app = create_app(ServingSettings(model_uri="models:/fedseg-ui@champion", device="cpu", **settings),
                         loader=lambda uri: model)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Service:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.server.started:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def series(tmp_path: Path) -> tuple[list[Path], LoadedModel]:
    paths = _series(tmp_path)
    return paths, _model(paths)


@pytest.fixture
def service(series: tuple[list[Path], LoadedModel]) -> Iterator[tuple[str, list[Path]]]:
    paths, model = series
    with Service(model, auth="off") as running:
        yield running.base, paths


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":  # .ci/run installs it
            pytest.fail(f"{CHROMIUM} is not installed (Debian package chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (active.exists() and active.read_text().count("\n")):
            assert process.poll() is None, "chromium exited at start"
            time.sleep(0.05)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


READ_CANVAS = """(() => {
  const c = document.getElementById('view');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const red = [], gray = [];
  for (let i = 0; i < c.width * c.height; i++) {
    red.push(d[4*i] - d[4*i+1] > 60 ? 1 : 0);
    gray.push(d[4*i+1] === d[4*i+2] && d[4*i] === d[4*i+1] ? d[4*i] : -1);
  }
  return {width: c.width, height: c.height, slice: Number(document.getElementById('slice').value),
          red, gray, score: document.getElementById('score').textContent,
          model: document.getElementById('model').textContent};
})()"""


def _send(browser: DevTools, base: str, paths: list[Path], api_key: str = "") -> str:
    """Open the page, choose ``paths``, type ``api_key``, press the button; the final state."""
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/ui")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('files')")
    root = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])
    browser.evaluate(f"document.getElementById('apikey').value = {json.dumps(api_key)}")
    browser.evaluate("document.getElementById('run').click()")
    return browser.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")


def test_page_shows_slices_mask_and_score(service: tuple[str, list[Path]], browser: DevTools) -> None:
    base, paths = service
    # what the API itself answers for the same files, in the same order
    api = httpx.post(f"{base}/v1/predict",
                     files=[("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths],
                     timeout=60).json()
    mask = rle_decode(api["mask"]["rle"], api["mask"]["shape"])
    assert 0 < mask.sum() < mask.size  # a partial mask: overlay and no overlay both appear
    assert not np.array_equal(mask[0], mask[1])  # so showing the wrong slice's mask would fail

    state = _send(browser, base, list(reversed(paths)))
    assert state == "done", browser.evaluate("document.getElementById('message').textContent")

    shown = browser.evaluate(READ_CANVAS)
    assert (shown["height"], shown["width"]) == SHAPE[1:]
    k = shown["slice"]
    expected = mask[k].reshape(-1)
    # the overlay is exactly the API's mask of the slice shown (files were chosen in reverse order:
    # the page orders slices as the service does)
    assert np.array_equal(np.array(shown["red"]), expected)
    gray = np.array(shown["gray"])
    outside = gray[expected == 0]
    assert (outside >= 0).all() and outside.std() > 10  # the slice's own pixels, not a blank
    assert f"{api['score']:.3f}" in shown["score"] and api["status"] in shown["score"]
    assert "fedseg-ui version 5" == shown["model"]

    # the slider moves to another slice and the overlay follows
    other = (k + 1) % SHAPE[0]
    browser.evaluate(f"const s = document.getElementById('slice'); s.value = '{other}';"
                     "s.dispatchEvent(new Event('input'))")
    moved = browser.evaluate(READ_CANVAS)
    assert moved["slice"] == other and np.array_equal(np.array(moved["red"]), mask[other].reshape(-1))


def test_page_and_assets_are_served_without_external_references(service: tuple[str, list[Path]]) -> None:
    base, _ = service
    page = httpx.get(f"{base}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("ui.js", "ui.css"):
        assert httpx.get(f"{base}/ui/{name}").status_code == 200
    assert httpx.get(f"{base}/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{base}/ui/app.py").status_code == 404
    for text in (page.text, httpx.get(f"{base}/ui/ui.js").text):
        assert "http://" not in text and "https://" not in text  # no CDN, no other origin


def test_page_sends_the_api_key(series: tuple[list[Path], LoadedModel], browser: DevTools) -> None:
    from serving.security.apikeys import ApiKeyStore

    paths, model = series
    _, key = ApiKeyStore().create("ui-test", "predict")  # $FEDSEG_HOME of this test
    with Service(model, auth="apikey") as running:
        assert _send(browser, running.base, paths) == "error"
        message = browser.evaluate("document.getElementById('message').textContent")
        assert message.startswith("401") and "Bearer" in message
        assert _send(browser, running.base, paths, api_key=key) == "done"
        assert browser.evaluate("document.getElementById('score').textContent").startswith("Triage score")
