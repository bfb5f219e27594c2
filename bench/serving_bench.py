#!/usr/bin/env python
"""Serving benchmark: `fedseg serve` vs `mlflow models serve` of the same registered version.

Each model (random weights: speed does not depend on training) is published to a temporary
registry: the default spec, the spec the LGG benchmarks train (bench/quality.py: U-Net 16,32,64
at 64x64) and a full-resolution LGG-size U-Net (16,32,64,128 at 128x128, the FLAIR slices'
own size). For each, both servers are started in turn as real processes on loopback and loaded
by a minimal asyncio HTTP/1.1 client (one keep-alive connection per worker) at each
concurrency level:

- ``fedseg serve``, one process, three routes in turn: ``POST /v1/predict`` with the series'
  DICOM files (multipart), where the service reads the DICOM, preprocesses, runs the U-Net,
  thresholds, scores and RLE-encodes the mask; and ``POST /v2/models/{name}/infer`` (Open
  Inference Protocol) with the preprocessed tensor, as raw bytes (binary data extension) and as
  JSON data, answering the probabilities the same way;
- ``mlflow models serve --env-manager local``: ``POST /invocations`` with the same pixels already
  preprocessed (``{"inputs": (N, 1, S, S)}``, what the pyfunc flavor of registry/pyfunc_model.py
  takes); it returns the probabilities as JSON.

The bare forward is the U-Net on the same preprocessed slices in this process
(``imaging.training.predict_probabilities``), and the in-process pipeline the service's own
``Predictor.predict`` on the decoded series, without HTTP. The CPU seconds each server process
(with its children) and the client used per level are recorded too. Results go to
``bench/results/serving.json`` and the "Serving" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, git_version, header, machine, now, update_section, write_json  # noqa: E402

SECTION = "Serving: throughput and latency vs `mlflow models serve`"
MODEL = "fedseg-bench"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------- set-up


def publish(spec, name: str = MODEL) -> str:
    """Publish a random-weights model in $FEDSEG_HOME's registry; return its ``models:/NAME/VERSION``
    URI."""
    import torch

    from imaging.model import build_unet
    from registry import TrackingRun, default_store, publish_model

    torch.manual_seed(0)
    store = default_store()
    run = TrackingRun.start(store, "serving-bench", "publish", {})
    published = publish_model(store, run, name, build_unet(spec).state_dict(), spec,
                              {"dice_pooled": 0.5}, {})
    run.end(ok=True)
    return f"models:/{name}/{published.version}"


def write_series(out: Path, slices: int, size: int) -> list[Path]:
    from imaging.dicom_write import write_series as write

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 1000, size=(slices, size, size))
    pixels[:, size // 4: size // 2, size // 4: size // 2] += 2000
    return write(out, pixels, patient_id="BENCH", patient_name="Bench^Series", uid_seed="bench",
                 modality="MR", spacing=(3.0, 0.9, 0.9), manufacturer="Bench")


def multipart(paths: list[Path]) -> tuple[bytes, str]:
    """One pre-built multipart body, so the client does not rebuild it per request."""
    boundary = uuid.uuid4().hex
    parts = []
    for p in paths:
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.name}\"\r\n"
            f"Content-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def bare_forward(uri: str, paths: list[Path], repeats: int) -> dict[str, float]:
    """:func:`measure_bare` in a fresh process: torch keeps one OpenMP team per thread that ran
    a parallel forward, and the teams left in this process by earlier models' measurements
    would slow the next model's forward."""
    argv = [sys.executable, __file__, "--bare-forward", uri, str(repeats), *map(str, paths)]
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bare forward failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_seconds(call: Callable[[], object], repeats: int, warm: int = 3) -> float:
    """Median seconds of ``call`` over ``repeats`` back-to-back calls, after ``warm`` untimed ones."""
    for _ in range(warm):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bare(uri: str, paths: list[Path], repeats: int) -> dict[str, float]:
    """Median seconds of the U-Net forward alone, eager and compiled as the service compiles it
    (serving.compiled), and of the service's eager in-process pipeline."""
    import torch

    from imaging.dicom_read import read_series
    from imaging.model import load_state_dict
    from imaging.preprocess import preprocess_image
    from imaging.training import predict_probabilities
    from registry import default_store, load_model
    from serving.compiled import CompiledNet
    from serving.predictor import Predictor

    loaded = load_model(default_store(), uri)
    volume = read_series(paths)
    images = preprocess_image(volume.pixels, loaded.spec)
    net = load_state_dict(loaded.spec, loaded.state_dict).eval()
    device = torch.device("cpu")
    with torch.inference_mode():
        forward_s = _median_seconds(lambda: predict_probabilities(net, images, device=device), repeats)
        start = time.perf_counter()
        compiled = CompiledNet(net)
        predict_probabilities(compiled, images, device=device)  # compiles
        compile_s = time.perf_counter() - start
        compiled_s = _median_seconds(
            lambda: predict_probabilities(compiled, images, device=device), repeats)
    predictor = Predictor(loaded, device="cpu")

    def pipeline() -> None:
        read_series(paths)
        predictor.predict(volume)

    return {"forward_s": forward_s, "pipeline_s": _median_seconds(pipeline, repeats),
            "compiled_forward_s": compiled_s, "compile_s": compile_s,
            "slices": int(images.shape[0]), "net_input": list(images.shape)}


def tensor(paths: list[Path], spec) -> np.ndarray:
    """The series preprocessed as the model takes it: float32 ``(N, 1, S, S)``."""
    from imaging.dicom_read import read_series
    from imaging.preprocess import preprocess_image

    return preprocess_image(read_series(paths).pixels, spec)[:, None].astype(np.float32)


def mlflow_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def oip_json_body(images: np.ndarray) -> bytes:
    """An Open Inference Protocol request with the tensor as JSON data (JSON answer)."""
    return json.dumps({"inputs": [{"name": "slices", "shape": list(images.shape),
                                   "datatype": "FP32", "data": images.ravel().tolist()}]}).encode()


def oip_binary_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An OIP request with the binary data extension, asking for binary probabilities back."""
    header = json.dumps({
        "inputs": [{"name": "slices", "shape": list(images.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + images.tobytes(), {"content-type": "application/octet-stream",
                                       "inference-header-content-length": str(len(header))}


# ---------------------------------------------------------------------- servers


class Server:
    """A server process on loopback, stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], ready_url: str, log: Path) -> None:
        self.name, self.argv, self.env, self.ready_url, self.log = name, argv, env, ready_url, log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        out = self.log.open("wb")
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after 180 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:  # the load failed: say what the server said
            print(f"--- {self.name} log (last lines)\n{self.log.read_text()[-3000:]}", file=sys.stderr)
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far (0 without one)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator.

    httpx spends 3-4 ms of CPU per request here, on the two cores the server uses too, and that
    would count as serving latency; this client writes a request and reads a ``Content-Length``
    answer with next to nothing around it (about 0.2 ms).
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers = {"host": f"{self.host}:{self.port}", **{k.lower(): v for k, v in headers.items()}}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.timing = ""  # the last answer's Server-Timing header

    def forward_ms(self) -> float | None:
        """The ``forward`` duration of the last answer's Server-Timing (fedseg), if any."""
        for item in self.timing.split(","):
            name, _, dur = item.strip().partition(";dur=")
            if name == "forward" and dur:
                return float(dur)
        return None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._post(body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            # the server closed the idle keep-alive connection (uvicorn: after 5 s): reconnect
            await self.close()
            return await self._post(body)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"POST {self.path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in {**self.headers, "content-length": str(len(body))}.items())
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readuntil(b"\r\n")
        fields = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        values = dict(line.split(":", 1) for line in fields.split("\r\n") if ":" in line)
        if "content-length" not in values:
            raise RuntimeError(f"{self.path}: an answer without Content-Length")
        self.timing = values.get("server-timing", "").strip()
        return int(status_line.split()[1]), await self.reader.readexactly(int(values["content-length"]))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(url: str, body: bytes, headers: dict[str, str], concurrency: int, requests: int,
               check: str, warmup: int, server_pid: int | None = None) -> dict[str, float]:
    """``requests`` POSTs from ``concurrency`` workers, one keep-alive connection each; latency
    percentiles and throughput."""
    latencies: list[float] = []
    forwards: list[float] = []  # the service's own forward per request (Server-Timing), seconds
    errors = 0
    todo = iter(range(requests))
    connections = [Connection(url, headers) for _ in range(concurrency)]

    async def worker(conn: Connection) -> None:
        nonlocal errors
        for _ in todo:
            start = time.perf_counter()
            status, answer = await conn.post(body)
            latencies.append(time.perf_counter() - start)
            if status != 200 or check.encode() not in answer[:300]:
                errors += 1
            if (forward := conn.forward_ms()) is not None:
                forwards.append(forward / 1000)

    try:
        # warm-up, not counted: a few requests alone (first-call costs), then every connection once
        for _ in range(warmup):
            await connections[0].post(body)
        await asyncio.gather(*(conn.post(body) for conn in connections))
        server0, client0 = cpu_seconds(server_pid), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(conn) for conn in connections))
        wall = time.perf_counter() - start
        server_cpu, client_cpu = cpu_seconds(server_pid) - server0, time.process_time() - client0
    finally:
        for conn in connections:
            await conn.close()
    return {
        "concurrency": concurrency, "requests": requests, "errors": errors,
        "throughput_rps": requests / wall,
        "server_cpu_ms_per_request": 1000 * server_cpu / requests,
        "client_cpu_ms_per_request": 1000 * client_cpu / requests,
        "p50_ms": 1000 * _percentile(latencies, 50), "p99_ms": 1000 * _percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        **_around_forward(latencies, forwards),
    }


def _around_forward(latencies: list[float], forwards: list[float]) -> dict[str, float]:
    """Per request, the time around the service's own forward (latency - forward), at p50, and
    its ratio to that forward; only at concurrency 1, where a request's forward is its own."""
    if not forwards or len(forwards) != len(latencies):
        return {}
    around = [lat - fwd for lat, fwd in zip(latencies, forwards)]
    ratio = [a / fwd for a, fwd in zip(around, forwards) if fwd > 0]
    return {"service_forward_p50_ms": 1000 * _percentile(forwards, 50),
            "around_forward_p50_ms": 1000 * _percentile(around, 50),
            "around_forward_ratio_p50": _percentile(ratio, 50)}


def run_levels(name: str, url: str, body: bytes, headers: dict[str, str], levels: list[int],
               requests: int, check: str, metrics_url: str | None = None,
               server_pid: int | None = None) -> list[dict]:
    rows = []
    for c in levels:
        before = stage_totals(metrics_url) if metrics_url else {}
        row = asyncio.run(load(url, body, headers, c, max(requests, 2 * c), check, warmup=5,
                               server_pid=server_pid))
        if metrics_url:  # includes the level's warm-up requests
            row["stages_ms"] = stage_means(before, stage_totals(metrics_url))
        print(f"{name:>15} c={c:<3} {row['throughput_rps']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
              f"p99 {row['p99_ms']:8.1f} ms  server CPU {row['server_cpu_ms_per_request']:6.1f} ms/req  "
              f"errors {row['errors']}", flush=True)
        rows.append(row)
    return rows


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(seconds, count) per prediction stage so far, from the service's own /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        if family.name != "fedseg_stage_duration_seconds":
            continue
        for sample in family.samples:
            t = totals.setdefault(sample.labels.get("stage", ""), [0.0, 0.0])
            if sample.name.endswith("_sum"):
                t[0] += sample.value
            elif sample.name.endswith("_count"):
                t[1] += sample.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean milliseconds per observation of each stage between two scrapes."""
    out = {}
    for stage, (seconds, count) in sorted(after.items()):
        s0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            out[stage] = round(1000 * (seconds - s0) / (count - c0), 2)
    return out


def served_settings(uri: str) -> dict[str, object]:
    """The batching settings `fedseg serve` ran with (defaults plus FEDSEG_SERVE_* variables)."""
    from serving.settings import ServingSettings

    values = ServingSettings(model_uri=uri).model_dump()
    out = {k: v for k, v in sorted(values.items()) if "batch" in k or k in ("device", "compile")}
    return out


# ---------------------------------------------------------------------- report

#: The models measured: key -> (what it is, spec keyword arguments).
MODELS: dict[str, tuple[str, dict]] = {
    "default": ("the default spec", {}),
    "lgg": ("the spec the LGG benchmarks train (bench/quality.py)", {"channels": (16, 32, 64)}),
    "lgg128": ("an LGG-size U-Net at the FLAIR slices' full 128x128",
               {"channels": (16, 32, 64, 128), "image_size": 128}),
}
WHY_OVERHEAD = (
    "Reading the overhead: on `/v1/predict` the service does a fixed amount of work per series "
    "around the forward, whatever the model: check and parse 16 DICOM files and decode them, "
    "window and resize a million voxels, resize the probabilities back to 256x256, score, "
    "threshold and RLE-encode them, and move 2 MiB of multipart in and the JSON mask out; that "
    "cannot be under 15% of a forward of a few milliseconds. `POST /v2/models/{name}/infer` "
    "(binary) takes the same input as `mlflow models serve`, the preprocessed tensor, so its "
    "overhead is the serving itself: HTTP, decoding, the micro-batcher, the hand-off to the "
    "forward thread. The bare forward, measured apart in a fresh process, moves by 20-30% "
    "between minutes on this shared 2-core machine, as much as the goal; the per-request figure "
    "sets each answer's latency against the forward that produced it (the service's "
    "`Server-Timing` header), on the same request, so that drift cancels out."
)
THROUGHPUT_GOAL = 2.0  # x `mlflow models serve`
OVERHEAD_GOAL = 0.15  # of the bare forward, at p50, concurrency 1
#: The rows of a model's table: results key -> what the client sent where.
ROUTES: dict[str, str] = {
    "fedseg": "fedseg DICOM",
    "fedseg-oip": "fedseg OIP binary",
    "fedseg-oip-json": "fedseg OIP JSON",
    "mlflow": "mlflow",
    "floor": "HTTP floor (bare uvicorn)",
}


def _level(model: dict, route: str, concurrency: int) -> dict | None:
    return next((r for r in model["results"].get(route, []) if r["concurrency"] == concurrency), None)


def overhead(model: dict, route: str = "fedseg") -> float | None:
    """(p50 of ``route`` at concurrency 1 - bare forward) / bare forward."""
    row = _level(model, route, 1)
    if row is None:
        return None
    forward_ms = 1000 * model["bare"]["forward_s"]
    return (row["p50_ms"] - forward_ms) / forward_ms


def ratios(model: dict, route: str = "fedseg") -> dict[int, float]:
    """Throughput of ``route`` over `mlflow models serve`'s, per concurrency."""
    fed = {r["concurrency"]: r for r in model["results"].get(route, [])}
    ml = {r["concurrency"]: r for r in model["results"].get("mlflow", [])}
    return {c: fed[c]["throughput_rps"] / ml[c]["throughput_rps"] for c in fed if c in ml}


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def model_markdown(payload: dict, key: str, model: dict) -> list[str]:
    b = model["bare"]
    spec = model["spec"]
    fwd = 1000 * b["forward_s"]
    lines = [
        f"### {key}: U-Net {tuple(spec['channels'])} at {spec['image_size']}x{spec['image_size']} "
        f"({model['what']})",
        "",
        f"`{model['model_uri']}`; bare U-Net forward on the {b['slices']} preprocessed slices: "
        f"**{fwd:.1f} ms** (median of {payload['repeats']} back to back, in a fresh process, "
        f"torch's default threads); compiled as the service compiles it (`torch.compile`, "
        f"serving/compiled.py): **{1000 * b['compiled_forward_s']:.1f} ms** (compiled "
        f"in {b['compile_s']:.0f} s); the eager in-process pipeline (read DICOM + "
        f"`Predictor.predict`): {1000 * b['pipeline_s']:.1f} ms.",
        "",
        "| server, route | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) | server CPU (ms/req) "
        "| client CPU (ms/req) | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for route, label in ROUTES.items():
        for r in model["results"].get(route, []):
            lines.append(
                f"| {label} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r.get('server_cpu_ms_per_request', float('nan')):.1f} | "
                f"{r.get('client_cpu_ms_per_request', float('nan')):.1f} | {r['errors']} |")
    lines.append("")
    for route in ("fedseg", "fedseg-oip-json", "fedseg-oip"):
        rat = ratios(model, route)
        if rat:
            lines.append(
                f"Throughput of {ROUTES[route]} over `mlflow models serve`: "
                + ", ".join(f"c={c}: **{v:.2f}x**" for c, v in rat.items())
                + f" (goal >= {THROUGHPUT_GOAL:.0f}x: **{_met(min(rat.values()) >= THROUGHPUT_GOAL)}**)."
                + "  ")
    for route in ("fedseg", "fedseg-oip"):
        over, row = overhead(model, route), _level(model, route, 1)
        if over is None or row is None:
            continue
        text = (f"Overhead of {ROUTES[route]} at p50, concurrency 1: {row['p50_ms']:.1f} ms - "
                f"{fwd:.1f} ms forward = {row['p50_ms'] - fwd:.1f} ms, **{100 * over:.0f}%** of the "
                f"bare forward (goal < {100 * OVERHEAD_GOAL:.0f}%: **{_met(over < OVERHEAD_GOAL)}**)")
        lines.append(text + ".  ")
        compiled = 1000 * b["compiled_forward_s"]
        lines.append(f"The same p50 against the bare *compiled* forward ({compiled:.1f} ms, what the "
                     f"service runs): {row['p50_ms'] - compiled:.1f} ms, "
                     f"{100 * (row['p50_ms'] - compiled) / compiled:.0f}%.  ")
        if "around_forward_ratio_p50" in row:
            ratio = row["around_forward_ratio_p50"]
            lines.append(
                f"Per request ({ROUTES[route]}, c=1), against the service's own forward of that "
                f"request (its `Server-Timing` header; p50 {row['service_forward_p50_ms']:.1f} ms): "
                f"the time around it is {row['around_forward_p50_ms']:.1f} ms at p50, "
                f"**{100 * ratio:.0f}%** of the forward (goal < {100 * OVERHEAD_GOAL:.0f}%: "
                f"**{_met(ratio < OVERHEAD_GOAL)}**).  ")
    floor = _level(model, "floor", 1)
    if floor is not None:
        lines.append(
            f"HTTP floor: a bare ASGI app under uvicorn that reads the same binary request and "
            f"answers as many bytes as the OIP route, computing nothing, takes "
            f"**{floor['p50_ms']:.2f} ms** at p50 (c=1): the least any server adds to the "
            f"forward here, {100 * floor['p50_ms'] / fwd:.0f}% of the bare forward.  ")
    staged = [r for r in model["results"].get("fedseg", []) if r.get("stages_ms")]
    if staged:
        names = [k for k in ("read", "preprocess", "forward", "postprocess") if k in staged[0]["stages_ms"]]
        lines += ["", f"Per stage of {ROUTES['fedseg']} (`fedseg_stage_duration_seconds` from the "
                  "service's `/metrics`, mean ms; `read` includes the upload checks; `forward` is "
                  "per micro-batch, shared by the requests batched together):", "",
                  "| concurrency | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in staged:
            lines.append(f"| {r['concurrency']} | " + " | ".join(
                f"{r['stages_ms'].get(k, float('nan')):.1f}" for k in names) + " |")
    return [*lines, ""]


def markdown(payload: dict) -> str:
    series = payload["series"]
    lines = [
        f"Both servers serve the same registered version of each model (random weights) on a "
        f"{series['slices']}-slice {series['size']}x{series['size']} MR series "
        f"({series['bytes'] / 2**20:.1f} MiB of DICOM), one process each, on the CPU, one after the "
        f"other, loaded from this machine by a minimal asyncio HTTP/1.1 client, one keep-alive "
        f"connection per concurrent worker ({payload['requests']} requests per "
        "level after a warm-up of 5 sequential requests and one per connection; **the client shares "
        "the two cores with the server**, its CPU per request is in the tables). "
        "`fedseg serve` is measured on three routes of one process: **DICOM** `POST /v1/predict` "
        "gets the DICOM files (multipart) and does everything: check, read, preprocess, forward, "
        "threshold, triage score, RLE mask; **OIP binary** and **OIP JSON** `POST "
        "/v2/models/{name}/infer` get the preprocessed tensor (Open Inference Protocol, raw bytes "
        "or JSON data) and answer the probabilities the same way. `mlflow models serve "
        "--env-manager local` gets the same tensor as JSON (what its pyfunc flavor takes) and "
        "returns the probabilities as JSON. `fedseg serve` runs its default settings, so its "
        "forward is compiled (`torch.compile`, `FEDSEG_SERVE_COMPILE`); mlflow's is eager. "
        "Overhead = (p50 at concurrency 1 - bare forward) / bare forward, the bare forward being "
        "the eager U-Net called in-process, as a user of the registered model would call it; "
        "each model's section also sets the p50 against the bare compiled forward.",
        "",
        header(payload),
    ]
    for key, model in payload["models"].items():
        lines += model_markdown(payload, key, model)
    goals = []
    for key, model in payload["models"].items():
        for route in ("fedseg", "fedseg-oip-json", "fedseg-oip"):
            rat = ratios(model, route)
            if rat:
                goals.append(f"{key} {ROUTES[route]}: throughput {min(rat.values()):.2f}-"
                             f"{max(rat.values()):.2f}x mlflow "
                             f"({_met(min(rat.values()) >= THROUGHPUT_GOAL)})")
        for route in ("fedseg", "fedseg-oip"):
            over, row = overhead(model, route), _level(model, route, 1)
            if over is not None:
                goals.append(f"{key} {ROUTES[route]}: overhead {100 * over:.0f}% over the bare "
                             f"forward ({_met(over < OVERHEAD_GOAL)})")
            if row is not None and "around_forward_ratio_p50" in row:
                ratio = row["around_forward_ratio_p50"]
                goals.append(f"{key} {ROUTES[route]}: {100 * ratio:.0f}% around the service's own "
                             f"forward, per request ({_met(ratio < OVERHEAD_GOAL)})")
    if goals:
        lines += ["Goals of issue #5 (>= 2x `mlflow models serve` throughput at every concurrency, "
                  "< 15% overhead over the bare forward at p50):", "",
                  *(f"- {g}" for g in goals)]
    if payload.get("fedseg_settings"):
        lines += ["", "`fedseg serve` settings: " + ", ".join(
            f"{k} {v}" for k, v in payload["fedseg_settings"].items()) + "."]
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def bench_model(key: str, spec, args: argparse.Namespace, tmp: Path, paths: list[Path],
                body: bytes, content_type: str, env: dict[str, str]) -> dict:
    from registry import default_store

    name = f"{MODEL}-{key}"
    uri = publish(spec, name=name)
    bare = bare_forward(uri, paths, args.repeats)
    print(f"[{key}] bare forward {1000 * bare['forward_s']:.1f} ms, pipeline "
          f"{1000 * bare['pipeline_s']:.1f} ms", flush=True)
    images = tensor(paths, spec)
    results: dict[str, list[dict]] = {}
    if "fedseg" in args.servers:  # one process, its three routes in turn
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [str(BIN / "fedseg"), "serve", "--model", uri, "--port", str(port), "--log-level", "warning"]
        binary, binary_headers = oip_binary_body(images)
        routes = {
            "fedseg": ("/v1/predict", body, {"content-type": content_type}, '"score"'),
            "fedseg-oip": (f"/v2/models/{name}/infer", binary, binary_headers, '"probabilities"'),
            "fedseg-oip-json": (f"/v2/models/{name}/infer", oip_json_body(images),
                                {"content-type": "application/json"}, '"probabilities"'),
        }
        with Server("fedseg", argv, env, f"{base}/health/ready", tmp / f"fedseg-{key}.log") as server:
            for route, (path, data, headers, check) in routes.items():
                results[route] = run_levels(
                    route, base + path, data, headers, args.concurrency, args.requests, check,
                    metrics_url=f"{base}/metrics", server_pid=server.process.pid)
        port = _free_port()  # the HTTP floor: the same bytes in and out, nothing computed
        floor_env = {**env, "FEDSEG_BENCH_FLOOR_BYTES": str(images.nbytes)}
        argv = [str(BIN / "uvicorn"), "--app-dir", str(ROOT / "bench"), "http_floor:app",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        with Server("floor", argv, floor_env, f"http://127.0.0.1:{port}/",
                    tmp / f"floor-{key}.log") as server:
            results["floor"] = run_levels("floor", f"http://127.0.0.1:{port}/", binary,
                                          binary_headers, [1], args.requests, "xxx",
                                          server_pid=server.process.pid)
    if "mlflow" in args.servers:
        port = _free_port()
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": default_store().tracking_uri}
        argv = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
        with Server("mlflow", argv, mlflow_env, f"http://127.0.0.1:{port}/ping",
                    tmp / f"mlflow-{key}.log") as server:
            results["mlflow"] = run_levels(
                "mlflow", f"http://127.0.0.1:{port}/invocations", mlflow_body(images),
                {"content-type": "application/json"}, args.concurrency, args.requests,
                "predictions", server_pid=server.process.pid)
    return {"what": MODELS[key][0], "model_uri": uri,
            "spec": {"channels": list(spec.channels), "image_size": spec.image_size},
            "bare": bare, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="rows = cols of the series")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2x concurrency)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the bare forward")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--servers", nargs="+", choices=["fedseg", "mlflow"], default=["fedseg", "mlflow"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave results and BENCHMARKS.md")
    parser.add_argument("--bare-forward", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_forward:  # URI REPEATS PATH...: one model's bare forward, in its own process
        uri, repeats, *paths = args.bare_forward
        print(json.dumps(measure_bare(uri, [Path(p) for p in paths], int(repeats))))
        return

    from imaging.spec import ModelSpec

    tmp = Path(tempfile.mkdtemp(prefix="fedseg-serving-bench-"))
    os.environ["FEDSEG_HOME"] = str(tmp / "home")
    os.environ.update(FEDSEG_SERVE_AUTH="off", FEDSEG_SERVE_DEVICE="cpu")  # loopback, CPU
    for var in ("FEDSEG_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        paths = write_series(tmp / "series", args.slices, args.size)
        body, content_type = multipart(paths)
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FEDSEG_SERVE_AUTH": "off", "FEDSEG_SERVE_DEVICE": "cpu",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # mlflow execs `uvicorn`
        models = {key: bench_model(key, ModelSpec(**MODELS[key][1]), args, tmp, paths, body,
                                   content_type, env)
                  for key in args.models}
        load_after = os.getloadavg()
        payload = {
            "date": now(), "machine": machine(), "command": command_line(), "code_version": git_version(),
            "json": "bench/results/serving.json",
            "series": {"slices": args.slices, "size": args.size, "bytes": sum(p.stat().st_size for p in paths)},
            "requests": args.requests, "repeats": args.repeats, "models": models,
            "servers": {"fedseg": "`fedseg serve` POST /v1/predict (DICOM in, mask out)",
                        "fedseg-oip": "`fedseg serve` POST /v2/models/{name}/infer (binary tensor "
                                      "in, binary probabilities out)",
                        "fedseg-oip-json": "`fedseg serve` POST /v2/models/{name}/infer (JSON "
                                           "tensor in, JSON probabilities out)",
                        "mlflow": "`mlflow models serve` (JSON tensor in, JSON probabilities out)",
                        "floor": "bench/http_floor.py under uvicorn (the OIP binary request in, "
                                 "as many bytes out, nothing computed)"},
            "fedseg_settings": served_settings(next(iter(models.values()))["model_uri"]),
            "seconds": round(time.monotonic() - started),
            "notes": [f"Load average (1, 5, 15 min) when the run started: "
                      f"{', '.join(f'{v:.2f}' for v in load_before)}, when it ended: "
                      f"{', '.join(f'{v:.2f}' for v in load_after)}, on {os.cpu_count()} cores "
                      "(the bench itself keeps up to two busy); "
                      f"{round(time.monotonic() - started)} s in all.", WHY_OVERHEAD],
        }
        if args.no_write:
            print(markdown(payload))
            return
        write_json("serving", payload)
        update_section(SECTION, markdown(payload))
        print(f"wrote {ROOT / 'bench/results/serving.json'} and BENCHMARKS.md", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
