"""Asynchronous jobs: durable queue, idempotency, restarts and killed workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry.load import LoadedModel
from serving import ServingSettings, create_app
from serving.jobs import Job, JobStore, JobWorkers, default_jobs_root
from serving.uploads import UploadedFile

SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
Part = tuple[str, tuple[str, bytes, str]]
DEADLINE_S = 60.0  # generous: only a bound for a hung worker, never a timing assertion


def _model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(name="jobs-model", version=2, spec=SPEC, state_dict=build_unet(SPEC).state_dict())


MODEL = _model()


def _app(**settings: Any) -> FastAPI:
    settings = {"jobs_workers": 1, **settings}
    return create_app(
        ServingSettings(model_uri="models:/jobs-model@champion", device="cpu", auth="off", **settings),
        loader=lambda uri: MODEL,
    )


def _series(out: Path, seed: str, shape: tuple[int, int, int] = (2, 24, 32)) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    return write_series(out / seed, rng.integers(0, 1000, size=shape), patient_id="P-JOB",
                        patient_name="Job^Patient", uid_seed=seed, modality="MR",
                        spacing=(2.0, 0.8, 0.8))


def _parts(paths: list[Path]) -> list[Part]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    out = tmp_path_factory.mktemp("job-series")
    return {seed: _series(out, seed) for seed in ("a", "b", "c")}


def _wait(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something truthy (bounded by DEADLINE_S)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _finished(client: TestClient, location: str) -> dict:
    def check() -> dict | None:
        body = client.get(location).json()
        return body if body["status"] in ("done", "failed") else None

    return _wait(check, f"{location} to finish")


# ----------------------------------------------------------------------------- the API


def test_job_with_two_series_gives_the_predict_results(series: dict[str, list[Path]]) -> None:
    with TestClient(_app()) as client:
        files = _parts(series["a"]) + _parts(series["b"])
        submitted = client.post("/v1/jobs", files=files)
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert submitted.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] in ("queued", "running", "done")

        done = _finished(client, submitted.headers["location"])
        assert done["status"] == "done", done
        assert done["attempts"] == 1 and "error" not in done
        direct = [client.post("/v1/predict", files=_parts(series[s])).json() for s in ("a", "b")]
    assert done["result"]["series"] == direct  # same masks, scores and versions as /v1/predict
    assert not (default_jobs_root() / "jobs" / job["id"]).exists()  # inputs dropped once answered


def test_unknown_job_is_404_and_bad_uploads_are_refused_before_queueing() -> None:
    with TestClient(_app(jobs_workers=0)) as client:
        missing = client.get("/v1/jobs/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        bad = client.post("/v1/jobs", files=[("files", ("x.dcm", b"junk", "application/dicom"))])
        assert bad.status_code == 415 and "x.dcm" in bad.json()["detail"]
        store = client.post("/v1/jobs?store=true", files=[("files", ("x.dcm", b"junk", "a/b"))])
        assert store.status_code == 422 and "FEDSEG_SERVE_STOW_URL" in store.json()["detail"]
    assert JobStore(default_jobs_root()).depth() == 0


def test_a_series_that_cannot_be_read_fails_the_job_with_the_reason(
    series: dict[str, list[Path]], tmp_path: Path
) -> None:
    odd = _series(tmp_path, "a", shape=(1, 16, 16))[0]  # same series UID, other slice size
    with TestClient(_app()) as client:
        submitted = client.post("/v1/jobs", files=_parts(series["a"] + [odd]))
        assert submitted.status_code == 202, submitted.text
        failed = _finished(client, submitted.headers["location"])
    assert failed["status"] == "failed" and "result" not in failed
    assert "different sizes" in failed["error"] and failed["attempts"] == 1


def test_idempotency_key(series: dict[str, list[Path]]) -> None:
    pacs = "http://127.0.0.1:9/dicom-web"  # never contacted: no worker runs
    with TestClient(_app(jobs_workers=0, stow_url=pacs)) as client:
        files = _parts(series["a"]) + _parts(series["b"])
        first = client.post("/v1/jobs", files=files, headers={"Idempotency-Key": "order-17"})
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]

        # a retry, even with the files in another order: the same job, 200
        again = client.post("/v1/jobs", files=files[::-1], headers={"Idempotency-Key": "order-17"})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == job_id and again.headers["location"] == f"/v1/jobs/{job_id}"

        # the key with other files, or with other options: 409 naming the key and the job
        for query, other in (("", _parts(series["c"])), ("?store=true", files)):
            clash = client.post(f"/v1/jobs{query}", files=other, headers={"Idempotency-Key": "order-17"})
            assert clash.status_code == 409, clash.text
            assert "order-17" in clash.json()["detail"] and job_id in clash.json()["detail"]

        # no key: every request is a new job; a malformed key is a 400
        assert client.post("/v1/jobs", files=files).json()["id"] != job_id
        bad = client.post("/v1/jobs", files=files, headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["detail"]
    assert JobStore(default_jobs_root()).depth() == 2


def test_the_same_key_sent_concurrently_makes_one_job(series: dict[str, list[Path]]) -> None:
    store = JobStore(default_jobs_root())
    files = [UploadedFile(p.name, p.read_bytes()) for p in series["a"]]
    results: list[tuple[Job, bool]] = []
    barrier = threading.Barrier(4)

    def submit() -> None:
        barrier.wait()
        results.append(store.submit(files, {"store": False}, "race"))

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert [p.name for p in store.files_dir.iterdir()] == [results[0][0].id]  # no orphans


# ----------------------------------------------------------------------------- durability


def test_a_restarted_service_finishes_a_queued_job(series: dict[str, list[Path]]) -> None:
    with TestClient(_app(jobs_workers=0)) as client:  # accepts, runs nothing
        submitted = client.post("/v1/jobs", files=_parts(series["c"]))
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    stored = sorted(p.name for p in (default_jobs_root() / "jobs" / job_id).iterdir())
    assert stored == ["00000.dcm", "00001.dcm", "manifest.json"]  # on disk before the 202

    with TestClient(_app(jobs_workers=1)) as client:  # a new process over the same files
        done = _finished(client, f"/v1/jobs/{job_id}")
        direct = client.post("/v1/predict", files=_parts(series["c"])).json()
    assert done["status"] == "done" and done["attempts"] == 1
    assert done["result"]["series"] == [direct]


_DYING_WORKER = """
import os, sys, time
from pathlib import Path
from serving.jobs import JobStore
store = JobStore(Path(sys.argv[1]), lease_s=float(sys.argv[2]))
job = store.claim("doomed-worker")
print(job.id if job else "none", flush=True)
time.sleep(600)  # "working" until killed
"""


def test_a_killed_workers_job_is_run_again_exactly_once(series: dict[str, list[Path]]) -> None:
    lease_s = 1.0
    with TestClient(_app(jobs_workers=0)) as client:
        job_id = client.post("/v1/jobs", files=_parts(series["a"])).json()["id"]

    # a real worker process claims the job and is killed with SIGKILL mid-job
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = subprocess.Popen(
        [sys.executable, "-c", _DYING_WORKER, str(default_jobs_root()), str(lease_s)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == job_id
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    store = JobStore(default_jobs_root(), lease_s=lease_s)
    assert store.get(job_id).status == "running" and store.get(job_id).attempts == 1

    app = _app(jobs_workers=2, jobs_lease_s=lease_s)
    runs: list[str] = []
    jobs = app.state.jobs
    execute = jobs.workers.execute

    def counted(job: Job) -> dict:
        runs.append(job.id)
        return execute(job)

    jobs.workers.execute = counted
    with TestClient(app) as client:
        done = _finished(client, f"/v1/jobs/{job_id}")
        assert done["status"] == "done" and done["attempts"] == 2
        # leases have expired many times over: a done job is never claimed again
        time.sleep(3 * lease_s)
        assert client.get(f"/v1/jobs/{job_id}").json() == done
    assert runs == [job_id]
    # the dead worker, were it to come back, cannot overwrite the result
    assert not store.complete(job_id, "doomed-worker", {"series": []})
    assert store.get(job_id).result == done["result"]


def test_claims_are_exclusive_and_finished_jobs_are_final(series: dict[str, list[Path]]) -> None:
    store = JobStore(default_jobs_root(), lease_s=0.2, max_attempts=2)
    files = [UploadedFile(p.name, p.read_bytes()) for p in series["b"]]
    job, _ = store.submit(files, {}, None)

    claimed: list[Job | None] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        other = JobStore(default_jobs_root(), lease_s=0.2, max_attempts=2)  # as another process
        barrier.wait()
        claimed.append(other.claim(f"w{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in claimed if c is not None]
    assert len(winners) == 1 and winners[0].id == job.id

    # the lease runs out: claimed a second time; then max_attempts is reached
    second = _wait(lambda: store.claim("w-late"), "the lease to expire")
    assert second.id == job.id and second.attempts == 2

    def given_up() -> bool:  # None before the lease expires (running), then marked failed
        return store.claim("w-last") is None and store.get(job.id).status == "failed"

    _wait(given_up, "the job to be given up")
    failed = store.get(job.id)
    assert "gave up after 2 attempts" in (failed.error or "")
    assert not store.complete(job.id, "w-late", {"x": 1})  # a failed job stays failed

    done_job, _ = store.submit(files, {"n": 1}, None)
    owner_job = store.claim("w")
    assert owner_job is not None and owner_job.id == done_job.id
    assert store.complete(done_job.id, "w", {"ok": True})
    time.sleep(0.3)  # longer than the lease
    assert store.claim("w2") is None
    assert store.get(done_job.id).result == {"ok": True}


def test_a_live_worker_keeps_its_lease_while_a_long_job_runs(series: dict[str, list[Path]]) -> None:
    lease_s = 0.3
    store = JobStore(default_jobs_root(), lease_s=lease_s)
    job, _ = store.submit([UploadedFile(p.name, p.read_bytes()) for p in series["a"]], {}, None)
    runs: list[str] = []

    def slow(claimed: Job) -> dict:
        runs.append(claimed.id)
        time.sleep(5 * lease_s)  # many leases long: only the renewals keep others away
        return {"series": []}

    workers = JobWorkers(store, slow, threads=3, poll_s=0.05)
    workers.start()
    try:
        _wait(lambda: store.get(job.id).status == "done", "the slow job")
    finally:
        workers.stop()
    assert runs == [job.id] and store.get(job.id).attempts == 1
