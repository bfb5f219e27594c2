"""Model management of the service: hot reload from the registry, rollback, refused versions,
canary routing sticky per study, the /v2 (Open Inference Protocol) paths, micro-batching.

Every test runs a real MLflow registry (sqlite) under its own ``$FEDSEG_HOME`` and moves aliases
with the real ``fedseg registry`` commands.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient

import serving.predictor as predictor_module
from evidence import evaluated
from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import TrackingRun, default_store, generate_keypair, publish_model
from registry.cli import registry
from serving import ServingSettings, create_app, registry_loader
from serving.batching import MicroBatcher
from serving.models import ModelManager, canary_bucket

MODEL = "fedseg-unet-models"
URI = f"models:/{MODEL}@champion"
SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
SHAPE = (3, 40, 48)
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


# ----------------------------------------------------------------------------- helpers


def _publish(seed: int, dice: float) -> int:
    """Publish a tiny U-Net (weights from ``seed``) as a new version; returns its number."""
    torch.manual_seed(seed)
    store = default_store()
    run = TrackingRun.start(store, "serving-models-tests", f"publish-{seed}", {})
    published = publish_model(
        store, run, MODEL, build_unet(SPEC).state_dict(), SPEC, {"dice_pooled": dice}, evaluated()
    )
    run.end(ok=True)
    return published.version


def _cli(*args: str) -> str:
    result = CliRunner().invoke(registry, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _promote(version: int) -> None:
    _cli("promote", MODEL, str(version), "--force", "--reason", "test", "--actor", "tests")


def _set_challenger(version: int) -> None:
    _cli("challenger", MODEL, str(version), "--reason", "test", "--actor", "tests")


def _clear_challenger() -> None:
    _cli("challenger", MODEL, "--clear", "--reason", "test", "--actor", "tests")


def _series(tmp: Path, seed: str, study_uid: str | None = None) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    pixels = rng.integers(0, 1000, size=SHAPE)
    pixels[:, 10:20, 12:24] += 2000
    return write_series(
        tmp / seed, pixels, patient_id="P-TEST", patient_name="Test^Patient", uid_seed=seed,
        study_uid=study_uid, modality="MR", spacing=(2.0, 0.8, 0.8),
    )


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


def _settings(**overrides: object) -> ServingSettings:
    base: dict[str, object] = {"model_uri": URI, "device": "cpu", "auth": "off",
                               "reload_seconds": 0}
    return ServingSettings(**{**base, **overrides})


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@contextmanager
def _uvicorn(settings: ServingSettings) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loader=registry_loader),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ----------------------------------------------------------------------------- hot reload


def test_promote_and_rollback_swap_versions_with_no_failed_request(tmp_path: Path) -> None:
    assert _publish(1, 0.5) == 1  # champion
    assert _publish(2, 0.4) == 2  # worse: not promoted at publish
    files = _files(_series(tmp_path, "hot"))
    seen: list[tuple[int, int | None, str | None]] = []  # (status, body version, header)
    stop = threading.Event()

    with _uvicorn(_settings(reload_seconds=0.2)) as url:

        def send() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/v1/predict", files=files)
                    body = r.json() if r.status_code == 200 else {}
                    seen.append((r.status_code, body.get("model_version"),
                                 r.headers.get("X-Model-Version")))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            _wait_for(lambda: len(seen) >= 3, "requests on v1")
            _promote(2)
            _wait_for(lambda: seen[-1][1] == 2, "responses from v2")
            mark = len(seen)
            _wait_for(lambda: len(seen) >= mark + 3, "more requests on v2")
            out = _cli("rollback", MODEL, "--reason", "test", "--actor", "tests")
            assert "v1" in out or "version 1" in out
            _wait_for(lambda: seen[-1][1] == 1, "responses from v1 again")
            mark = len(seen)
            _wait_for(lambda: len(seen) >= mark + 3, "more requests on v1")
        finally:
            stop.set()
            sender.join(timeout=60)
        with httpx.Client(base_url=url, timeout=30) as http:
            meta = http.get(f"/v2/models/{MODEL}")
            metrics = http.get("/metrics").text

    assert all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200]
    assert all(header == str(version) for _, version, header in seen)
    versions = [v for _, v, _ in seen]
    # v1, then v2 from the swap on, then v1 from the rollback on: no flapping between them
    runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    assert runs == [1, 2, 1], runs
    assert meta.status_code == 200 and meta.headers["X-Model-Version"] == "1"
    assert meta.json()["versions"] == ["1"]
    assert _metric(metrics, "fedseg_model_reloads_total", outcome="ok") == 3  # start, promote, rollback
    assert _metric(metrics, "fedseg_model_reloads_total", outcome="failed") == 0


def test_a_version_whose_signature_fails_is_not_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _publish(1, 0.5) == 1
    rogue, _ = generate_keypair(tmp_path / "rogue-keys", name="rogue")  # not trusted
    monkeypatch.setenv("FEDSEG_SIGNING_KEY", str(rogue))
    assert _publish(2, 0.4) == 2
    monkeypatch.delenv("FEDSEG_SIGNING_KEY")
    files = _files(_series(tmp_path, "sig"))
    with TestClient(create_app(_settings(), loader=registry_loader)) as client:
        assert client.post("/v1/predict", files=files).json()["model_version"] == 1
        # promote refuses a version signed by an untrusted key: a registry writer moves the alias
        default_store().client().set_registered_model_alias(MODEL, "champion", "2")
        reload = client.post("/v1/admin/reload")
        assert reload.status_code == 200
        [champion] = reload.json()["reloads"]
        assert champion["outcome"] == "failed" and champion["version"] == 1
        assert "refusing" in champion["detail"] and "version 2" in champion["detail"]
        # still serving v1, still ready, and the refusal is visible
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200 and response.json()["model_version"] == 1
        assert client.get("/v2/health/ready").json() == {"ready": True}
        served = client.get(f"/v2/models/{MODEL}").json()["served"]
        assert served[0]["version"] == 1 and "version 2" in served[0]["detail"]
        # the refused version is not retried until the alias moves
        again = client.post("/v1/admin/reload").json()["reloads"][0]
        assert again["outcome"] == "unchanged"
        metrics = client.get("/metrics").text
        assert _metric(metrics, "fedseg_model_reloads_total", outcome="failed") == 1
        # the alias moves on to a good version: it is swapped in
        assert _publish(3, 0.3) == 3
        _promote(3)
        assert client.post("/v1/admin/reload").json()["reloads"][0]["outcome"] == "ok"
        assert client.post("/v1/predict", files=files).json()["model_version"] == 3


# ----------------------------------------------------------------------------- canary


def _studies(share: float) -> tuple[str, str]:
    """A study UID routed to the challenger at ``share`` and one routed to the champion."""
    uids = [f"{UID_ROOT}.{i}" for i in range(100)]
    canary = next(u for u in uids if canary_bucket(u) < share)
    plain = next(u for u in uids if canary_bucket(u) >= share)
    return canary, plain


def test_canary_is_sticky_per_study_and_can_be_dropped(tmp_path: Path) -> None:
    assert _publish(1, 0.5) == 1
    assert _publish(2, 0.4) == 2
    _set_challenger(2)
    canary_study, plain_study = _studies(0.3)
    series = {
        (study, n): _files(_series(tmp_path, f"{tag}-{n}", study_uid=study))
        for study, tag in ((canary_study, "canary"), (plain_study, "plain")) for n in range(2)
    }

    def version(study: str, n: int) -> int:
        r = client.post("/v1/predict", files=series[(study, n)])
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == str(r.json()["model_version"])
        return r.json()["model_version"]

    with TestClient(create_app(_settings(canary_share=0.3), loader=registry_loader)) as client:
        models: ModelManager = client.app.state.models
        # every series of a study meets the same version, asked twice
        assert [version(canary_study, n) for n in (0, 1, 0, 1)] == [2, 2, 2, 2]
        assert [version(plain_study, n) for n in (0, 1, 0, 1)] == [1, 1, 1, 1]
        # over many studies the challenger's share is the configured one
        studies = [f"{UID_ROOT}.9.{i}" for i in range(4000)]
        routed = [models.select(s).version for s in studies]
        assert routed.count(2) / len(studies) == pytest.approx(0.3, abs=0.03)
        assert [models.select(s).version for s in studies] == routed  # sticky
        meta = client.get(f"/v2/models/{MODEL}").json()
        assert meta["versions"] == ["1", "2"] and meta["canary_share"] == 0.3
        assert [(s["role"], s["version"]) for s in meta["served"]] == [
            ("champion", 1), ("challenger", 2)
        ]
        metrics = client.get("/metrics").text
        for v in ("1", "2"):  # requests counted per version
            assert _metric(metrics, "fedseg_requests_total", route="/v1/predict", version=v) == 4
        assert _metric(metrics, "fedseg_model_info", version="2", role="challenger") == 1

        # dropped without a restart: every study to the champion
        dropped = client.delete("/v1/admin/canary")
        assert dropped.status_code == 200 and dropped.json()["model"]["canary_share"] == 0
        assert version(canary_study, 0) == 1
        assert [s["role"] for s in client.get(f"/v2/models/{MODEL}").json()["served"]] == ["champion"]
        assert _metric(client.get("/metrics").text, "fedseg_model_info", role="challenger") == 0

        # a challenger that cannot be loaded is refused and nothing changes
        refused = client.put("/v1/admin/canary",
                             json={"share": 0.5, "challenger_uri": f"models:/{MODEL}/99"})
        assert refused.status_code == 409 and f"models:/{MODEL}/99" in refused.json()["detail"]
        assert models.canary_share == 0 and version(canary_study, 0) == 1
        bad = client.put("/v1/admin/canary", json={"share": 1.5})
        assert bad.status_code == 422
        # and back on, again without a restart
        on = client.put("/v1/admin/canary", json={"share": 0.3})
        assert on.status_code == 200 and on.json()["reloads"][0]["version"] == 2
        assert version(canary_study, 1) == 2 and version(plain_study, 1) == 1


def test_a_cleared_challenger_alias_is_dropped_and_a_set_one_loaded_without_a_restart(
    tmp_path: Path,
) -> None:
    assert _publish(1, 0.5) == 1
    assert _publish(2, 0.4) == 2
    _set_challenger(2)
    canary_study, plain_study = _studies(0.3)
    files = {study: _files(_series(tmp_path, tag, study_uid=study))
             for study, tag in ((canary_study, "canary"), (plain_study, "plain"))}
    seen: dict[str, list[tuple[int, int | None, str | None]]] = {canary_study: [], plain_study: []}
    stop = threading.Event()

    def more(study: str, n: int = 3) -> None:
        mark = len(seen[study])
        _wait_for(lambda: len(seen[study]) >= mark + n, f"{n} more requests of {study}")

    with _uvicorn(_settings(canary_share=0.3, reload_seconds=0.2)) as url:

        def send(study: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/v1/predict", files=files[study])
                    body = r.json() if r.status_code == 200 else {}
                    seen[study].append((r.status_code, body.get("model_version"),
                                        r.headers.get("X-Model-Version")))

        senders = [threading.Thread(target=send, args=(s,), daemon=True) for s in files]
        for t in senders:
            t.start()
        try:
            more(canary_study), more(plain_study)
            with httpx.Client(base_url=url, timeout=30) as http:
                assert http.get(f"/v2/models/{MODEL}").json()["versions"] == ["1", "2"]
            _clear_challenger()  # on the service's next registry check: every study to v1
            _wait_for(lambda: seen[canary_study][-1][1] == 1, "the canary study on the champion")
            more(canary_study)
            time.sleep(1.0)  # several more registry checks with no alias
            with httpx.Client(base_url=url, timeout=30) as http:
                cleared = http.get(f"/v2/models/{MODEL}").json()
                cleared_metrics = http.get("/metrics").text
            _set_challenger(2)  # loaded and warmed, then the canary study goes to it again
            _wait_for(lambda: seen[canary_study][-1][1] == 2, "the canary study on the challenger")
            more(canary_study), more(plain_study)
        finally:
            stop.set()
            for t in senders:
                t.join(timeout=60)
        with httpx.Client(base_url=url, timeout=30) as http:
            back = http.get(f"/v2/models/{MODEL}").json()
            metrics = http.get("/metrics").text

    every = seen[canary_study] + seen[plain_study]
    assert all(status == 200 for status, _, _ in every), [s for s in every if s[0] != 200]
    assert all(header == str(version) for _, version, header in every)
    canary = [v for _, v, _ in seen[canary_study]]
    runs = [v for i, v in enumerate(canary) if i == 0 or canary[i - 1] != v]
    assert runs == [2, 1, 2], runs  # challenger, champion once cleared, challenger once set again
    assert {v for _, v, _ in seen[plain_study]} == {1}

    # while cleared: no challenger version served, said why, and no failed reload counted
    assert cleared["versions"] == ["1"]
    challenger = next(s for s in cleared["served"] if s["role"] == "challenger")
    assert challenger["version"] is None and not challenger["ready"]
    assert "no challenger" in challenger["detail"]
    assert _metric(cleared_metrics, "fedseg_model_info", role="challenger") == 0
    assert _metric(cleared_metrics, "fedseg_model_info", version="1", role="champion") == 1
    assert _metric(cleared_metrics, "fedseg_model_reloads_total", outcome="failed") == 0
    # set again: served, counted as one more successful load
    assert back["versions"] == ["1", "2"]
    assert _metric(metrics, "fedseg_model_info", version="2", role="challenger") == 1
    assert _metric(metrics, "fedseg_model_reloads_total", outcome="ok") == 3  # v1, v2, v2 again
    assert _metric(metrics, "fedseg_model_reloads_total", outcome="failed") == 0


def test_admin_reload_drops_a_cleared_challenger_at_once(tmp_path: Path) -> None:
    assert _publish(1, 0.5) == 1
    assert _publish(2, 0.4) == 2
    assert _publish(3, 0.3) == 3
    canary_study, _ = _studies(0.3)
    files = _files(_series(tmp_path, "admin-canary", study_uid=canary_study))
    with TestClient(create_app(_settings(canary_share=0.3), loader=registry_loader)) as client:

        def served() -> int:
            r = client.post("/v1/predict", files=files)
            assert r.status_code == 200, r.text
            return int(r.headers["X-Model-Version"])

        assert served() == 1  # no alias yet: the champion alone
        meta = client.get(f"/v2/models/{MODEL}").json()
        assert meta["versions"] == ["1"] and "no challenger" in meta["served"][1]["detail"]
        reload = client.post("/v1/admin/reload").json()["reloads"]
        assert [(r["role"], r["outcome"]) for r in reload] == [("champion", "unchanged"),
                                                               ("challenger", "absent")]
        refused = client.put("/v1/admin/canary", json={"share": 0.5})  # nothing to load
        assert refused.status_code == 409 and "no challenger" in refused.json()["detail"]

        _set_challenger(2)
        [_, loaded] = client.post("/v1/admin/reload").json()["reloads"]
        assert (loaded["outcome"], loaded["version"]) == ("ok", 2) and served() == 2
        _set_challenger(3)  # moved: swapped like the champion
        [_, moved] = client.post("/v1/admin/reload").json()["reloads"]
        assert (moved["previous"], moved["version"], moved["outcome"]) == (2, 3, "ok")
        assert served() == 3

        _clear_challenger()
        [_, dropped] = client.post("/v1/admin/reload").json()["reloads"]
        assert (dropped["previous"], dropped["version"], dropped["outcome"]) == (3, None, "unloaded")
        assert served() == 1
        assert client.get(f"/v2/models/{MODEL}").json()["versions"] == ["1"]
        assert client.get(f"/v2/models/{MODEL}/versions/3").status_code == 404
        metrics = client.get("/metrics").text
        assert _metric(metrics, "fedseg_model_info", role="challenger") == 0
        assert _metric(metrics, "fedseg_model_reloads_total", outcome="failed") == 0
        assert client.get("/v2/health/ready").json() == {"ready": True}


# ----------------------------------------------------------------------------- /v2 paths


def test_open_inference_protocol_paths() -> None:
    assert _publish(1, 0.5) == 1
    with TestClient(create_app(_settings(), loader=registry_loader)) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        meta = client.get(f"/v2/models/{MODEL}")
        assert meta.status_code == 200 and meta.headers["X-Model-Version"] == "1"
        body = meta.json()
        assert (body["name"], body["versions"], body["platform"]) == (MODEL, ["1"], "pytorch")
        assert body["inputs"][0]["shape"] == [-1, 1, 32, 32]
        assert body["outputs"][0]["datatype"] == "FP32"
        assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
        assert client.get(f"/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]
        assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
        missing = client.get(f"/v2/models/{MODEL}/versions/7")
        assert missing.status_code == 404 and "version 7 is not being served" in missing.json()["detail"]
        other = client.get("/v2/models/another-model")
        assert other.status_code == 404 and "another-model" in other.json()["detail"]

    with TestClient(create_app(_settings(model_uri="models:/nope@champion"),
                               loader=registry_loader)) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert client.get("/v2/models/nope/ready").status_code == 503


# ----------------------------------------------------------------------------- micro-batching


def test_concurrent_requests_share_forward_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _publish(1, 0.5) == 1
    n = 6
    series = [_files(_series(tmp_path, f"mb-{i}")) for i in range(n)]
    settings = _settings(microbatch_max_slices=64, microbatch_wait_ms=0)
    with TestClient(create_app(settings, loader=registry_loader)) as client:
        predictor = client.app.state.models.champion.require()
        alone = [client.post("/v1/predict", files=s).json()["score"] for s in series]
        assert predictor.stats.forwards == n  # one at a time: one forward each

        real = predictor_module.predict_probabilities
        calls: list[int] = []

        def counting(net, images, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(len(images))
            if len(calls) == 1:  # hold the first forward until every other request queued
                first = len(images) // SHAPE[0]
                _wait_for(lambda: first + predictor.waiting >= n, "requests to queue")
            return real(net, images, **kwargs)

        monkeypatch.setattr(predictor_module, "predict_probabilities", counting)
        results: list[httpx.Response] = [None] * n  # type: ignore[list-item]

        def send(i: int) -> None:
            results[i] = client.post("/v1/predict", files=series[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    # n concurrent requests, 2 forwards: the first, and all that queued behind it together
    assert len(calls) == 2 and sum(calls) == n * SHAPE[0]
    stats = predictor.stats
    assert (stats.forwards, stats.requests) == (n + 2, 2 * n)
    assert stats.largest >= n // 2
    scores = {r.json()["series_instance_uid"]: r.json()["score"] for r in results}
    assert sorted(scores.values()) == pytest.approx(sorted(alone), abs=1e-5)


def test_batcher_waits_for_announced_requests_and_shares_errors() -> None:
    forwards: list[int] = []

    def forward(images: np.ndarray) -> np.ndarray:
        forwards.append(len(images))
        if np.isnan(images).any():
            raise RuntimeError("forward failed")
        return images * 2

    batcher = MicroBatcher(forward, max_slices=16, max_wait_s=60.0)
    out: dict[str, np.ndarray] = {}
    with batcher.ticket() as late:  # announced, still "preprocessing"
        runner = threading.Thread(target=lambda: out.setdefault("a", batcher.run(np.ones((2, 4, 4)))))
        runner.start()
        _wait_for(lambda: batcher.waiting == 1, "the first request to queue")
        out["b"] = batcher.run(np.full((3, 4, 4), 5.0), late)  # the collector waited for it
        runner.join(timeout=60)
    assert forwards == [5]
    np.testing.assert_array_equal(out["a"], np.full((2, 4, 4), 2.0))
    np.testing.assert_array_equal(out["b"], np.full((3, 4, 4), 10.0))

    # a ticket left unused (preprocessing failed) releases the collector at once
    with pytest.raises(ValueError), batcher.ticket():
        raise ValueError("bad pixels")
    np.testing.assert_array_equal(batcher.run(np.ones((1, 4, 4))), np.full((1, 4, 4), 2.0))

    # batches never exceed max_slices; a forward's error reaches every request of its batch
    with pytest.raises(RuntimeError, match="forward failed"):
        batcher.run(np.full((1, 4, 4), np.nan))
    assert batcher.run(np.ones((20, 4, 4))).shape == (20, 4, 4)  # larger than a batch: alone
    assert batcher.stats.forwards == 4 and batcher.stats.largest == 2


def test_batcher_from_the_event_loop_batches_on_the_forward_thread() -> None:
    calls: list[tuple[int, str, str | None]] = []
    started, release = threading.Event(), threading.Event()
    caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)

    def forward(images: np.ndarray) -> np.ndarray:
        calls.append((len(images), threading.current_thread().name, caller.get()))
        started.set()
        release.wait(60)
        return images + 1

    batcher = MicroBatcher(forward, max_slices=16, max_wait_s=0.0)

    async def three() -> list[tuple[np.ndarray, float]]:
        caller.set("loop")
        first = asyncio.ensure_future(batcher.run_async(np.zeros((1, 4, 4), np.float32)))
        await asyncio.to_thread(started.wait, 60)  # the first forward is running: the next two queue
        rest = [asyncio.ensure_future(batcher.run_async(np.full((n, 4, 4), n, np.float32)))
                for n in (2, 3)]
        await asyncio.to_thread(_wait_for, lambda: batcher.waiting == 2, "two queued requests")
        release.set()
        return [await first, *[await r for r in rest]]

    (a, _), (b, b_seconds), (c, _) = asyncio.run(three())
    # one forward for the first request, one for the two that queued behind it, on the batcher's
    # own thread (not the event loop's), in the context of the request that started the drain
    assert [n for n, _, _ in calls] == [1, 5]
    assert {name for _, name, _ in calls} != {threading.current_thread().name}
    assert all(name.startswith("fedseg-forward") and who == "loop" for _, name, who in calls)
    np.testing.assert_array_equal(a, np.ones((1, 4, 4)))
    np.testing.assert_array_equal(b, np.full((2, 4, 4), 3.0))
    np.testing.assert_array_equal(c, np.full((3, 4, 4), 4.0))
    assert b_seconds > 0 and batcher.stats.largest == 2


def test_batcher_outlives_a_cancelled_request_whose_loop_closed() -> None:
    started, release = threading.Event(), threading.Event()

    def forward(images: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(60)
        return images * 3

    batcher = MicroBatcher(forward, max_wait_s=0.0)
    loop = asyncio.new_event_loop()
    gone = loop.create_task(batcher.run_async(np.ones((1, 2, 2))))
    loop.run_until_complete(asyncio.to_thread(started.wait, 60))  # its forward is running
    gone.cancel()  # the client went away, then the loop closed (a service shutting down)
    loop.run_until_complete(asyncio.gather(gone, return_exceptions=True))
    loop.close()
    out: list[np.ndarray] = []
    behind = threading.Thread(target=lambda: out.append(batcher.run(np.ones((2, 2, 2)))))
    behind.start()
    _wait_for(lambda: batcher.waiting == 1, "a request queued behind the cancelled one")
    release.set()
    behind.join(timeout=60)
    assert gone.cancelled() and len(out) == 1  # the request behind still got its answer
    np.testing.assert_array_equal(out[0], np.full((2, 2, 2), 3.0))


def test_batcher_fails_requests_once_its_executor_is_shut_down() -> None:
    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(lambda images: images, executor=executor)
    assert batcher.run(np.ones((1, 2, 2))).shape == (1, 2, 2)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):  # an error, not a request waiting forever
        batcher.run(np.ones((1, 2, 2)))
    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(batcher.run_async(np.ones((1, 2, 2))))
    assert batcher.waiting == 0
