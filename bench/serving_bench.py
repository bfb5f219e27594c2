#!/usr/bin/env python
"""Serving benchmark: `fedseg serve` vs `mlflow models serve` of the same registered version.

A model (the default spec, random weights: speed does not depend on training) is published to a
temporary registry. Both servers are started in turn as real processes on loopback and loaded
with httpx async clients at each concurrency level:

- ``fedseg serve``: ``POST /v1/predict`` with the series' DICOM files (multipart); the service
  reads the DICOM, preprocesses, runs the U-Net, thresholds, scores and RLE-encodes the mask;
- ``mlflow models serve --env-manager local``: ``POST /invocations`` with the same pixels already
  preprocessed (``{"inputs": (N, 1, S, S)}``, what the pyfunc flavor of registry/pyfunc_model.py
  takes); it returns the probabilities as JSON.

The bare forward is the U-Net on the same preprocessed slices in this process
(``imaging.training.predict_probabilities``), and the in-process pipeline the service's own
``Predictor.predict`` on the decoded series, without HTTP. Results go to
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
from pathlib import Path

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


def publish(home: Path, spec) -> str:
    """Publish a random-weights model; return its ``models:/NAME/VERSION`` URI."""
    import torch

    from imaging.model import build_unet
    from registry import TrackingRun, default_store, publish_model

    torch.manual_seed(0)
    store = default_store()
    run = TrackingRun.start(store, "serving-bench", "publish", {})
    published = publish_model(store, run, MODEL, build_unet(spec).state_dict(), spec,
                              {"dice_pooled": 0.5}, {})
    run.end(ok=True)
    return f"models:/{MODEL}/{published.version}"


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
    """Median seconds of the U-Net forward alone, and of the service's in-process pipeline."""
    import torch

    from imaging.dicom_read import read_series
    from imaging.model import load_state_dict
    from imaging.preprocess import preprocess_image
    from imaging.training import predict_probabilities
    from registry import default_store, load_model
    from serving.predictor import Predictor

    loaded = load_model(default_store(), uri)
    volume = read_series(paths)
    images = preprocess_image(volume.pixels, loaded.spec)
    net = load_state_dict(loaded.spec, loaded.state_dict).eval()
    device = torch.device("cpu")
    forward = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            predict_probabilities(net, images, device=device)
        for _ in range(repeats):
            start = time.perf_counter()
            predict_probabilities(net, images, device=device)
            forward.append(time.perf_counter() - start)
    predictor = Predictor(loaded, device="cpu")
    pipeline = []
    for _ in range(3):
        predictor.predict(volume)
    for _ in range(repeats):
        start = time.perf_counter()
        read_series(paths)
        predictor.predict(volume)
        pipeline.append(time.perf_counter() - start)
    return {"forward_s": statistics.median(forward), "pipeline_s": statistics.median(pipeline),
            "slices": int(images.shape[0]), "net_input": list(images.shape)}


def mlflow_body(paths: list[Path], spec) -> bytes:
    from imaging.dicom_read import read_series
    from imaging.preprocess import preprocess_image

    images = preprocess_image(read_series(paths).pixels, spec)[:, None]
    return json.dumps({"inputs": images.astype(np.float32).tolist()}).encode()


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


async def load(url: str, body: bytes, content_type: str, concurrency: int, requests: int,
               check: str, warmup: int) -> dict[str, float]:
    """``requests`` POSTs from ``concurrency`` workers; latency percentiles and throughput."""
    import httpx

    latencies: list[float] = []
    errors = 0
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def worker() -> None:
            nonlocal errors
            for _ in todo:
                start = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": content_type})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200 or check not in r.text[:200]:
                    errors += 1

        # warm-up, not counted: a few requests alone (first-call costs), then every connection once
        for _ in range(warmup):
            await client.post(url, content=body, headers={"content-type": content_type})
        await asyncio.gather(*(client.post(url, content=body, headers={"content-type": content_type})
                               for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency, "requests": requests, "errors": errors,
        "throughput_rps": requests / wall,
        "p50_ms": 1000 * _percentile(latencies, 50), "p99_ms": 1000 * _percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
    }


def run_levels(name: str, url: str, body: bytes, content_type: str, levels: list[int],
               requests: int, check: str, metrics_url: str | None = None) -> list[dict]:
    rows = []
    for c in levels:
        before = stage_totals(metrics_url) if metrics_url else {}
        row = asyncio.run(load(url, body, content_type, c, max(requests, 2 * c), check, warmup=5))
        if metrics_url:  # includes the level's warm-up requests
            row["stages_ms"] = stage_means(before, stage_totals(metrics_url))
        print(f"{name:>7} c={c:<3} {row['throughput_rps']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
              f"p99 {row['p99_ms']:8.1f} ms  errors {row['errors']}", flush=True)
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
    return {k: v for k, v in sorted(values.items()) if "batch" in k or k == "device"}


# ---------------------------------------------------------------------- report


def markdown(payload: dict) -> str:
    b = payload["bare"]
    lines = [
        f"Both servers serve the same registered version (`{payload['model_uri']}`: default spec, "
        f"U-Net {payload['spec']['channels']} at {payload['spec']['image_size']}x"
        f"{payload['spec']['image_size']}, random weights) of a {payload['series']['slices']}-slice "
        f"{payload['series']['size']}x{payload['series']['size']} MR series "
        f"({payload['series']['bytes'] / 2**20:.1f} MiB of DICOM), one process each, on the CPU, "
        "one after the other, loaded from this machine by httpx async clients "
        f"({payload['requests']} requests per level after a warm-up of 5 sequential requests and one per "
        "connection; the client shares the cores). "
        "`fedseg serve` gets the DICOM files (multipart) and does everything: read, preprocess, "
        "forward, threshold, triage score, RLE mask. `mlflow models serve --env-manager local` "
        "gets the same pixels already preprocessed as JSON tensors (what its pyfunc flavor takes) "
        "and returns raw probabilities as JSON.",
        "",
        header(payload),
        "| server | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("fedseg", "mlflow"):
        for r in payload["results"].get(name, []):
            lines.append(f"| {payload['servers'][name]} | {r['concurrency']} | {r['throughput_rps']:.2f} | "
                         f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    lines += [
        "",
        f"Bare U-Net forward on the {b['slices']} preprocessed slices: **{1000 * b['forward_s']:.0f} ms** "
        f"(median of {payload['repeats']}); the service's in-process pipeline (read DICOM + "
        f"`Predictor.predict`): {1000 * b['pipeline_s']:.0f} ms.",
    ]
    fed = {r["concurrency"]: r for r in payload["results"].get("fedseg", [])}
    if 1 in fed:
        over = fed[1]["p50_ms"] - 1000 * b["forward_s"]
        lines.append(
            f"Overhead of `fedseg serve` over the bare forward at concurrency 1: {over:.0f} ms p50 "
            f"({fed[1]['p50_ms'] / (1000 * b['forward_s']):.1f}x the forward); of that, "
            f"{fed[1]['p50_ms'] - 1000 * b['pipeline_s']:.0f} ms is HTTP, multipart, threadpool and "
            "JSON (p50 minus the in-process pipeline), the rest DICOM decoding, preprocessing and "
            "postprocessing (below)."
        )
    ml = {r["concurrency"]: r for r in payload["results"].get("mlflow", [])}
    ratios = [f"{c}: {fed[c]['throughput_rps'] / ml[c]['throughput_rps']:.2f}x" for c in fed if c in ml]
    if ratios:
        lines.append("Throughput of `fedseg serve` over `mlflow models serve`, by concurrency: "
                     + ", ".join(ratios) + ".")
    staged = [r for r in payload["results"].get("fedseg", []) if r.get("stages_ms")]
    if staged:
        names = [k for k in ("read", "preprocess", "forward", "postprocess") if k in staged[0]["stages_ms"]]
        lines += ["", "Where `fedseg serve`'s time goes, from its own `/metrics` "
                  "(`fedseg_stage_duration_seconds`, mean ms per observation; forward is per micro-batch, "
                  "shared by the requests batched together):", "",
                  "| concurrency | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in staged:
            lines.append(f"| {r['concurrency']} | " + " | ".join(
                f"{r['stages_ms'].get(k, float('nan')):.1f}" for k in names) + " |")
        lines.append("")
    if payload.get("fedseg_settings"):
        lines.append("`fedseg serve` settings: " + ", ".join(
            f"{k} {v}" for k, v in payload["fedseg_settings"].items()) + ".")
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="rows = cols of the series")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2x concurrency)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of the bare forward")
    parser.add_argument("--servers", nargs="+", choices=["fedseg", "mlflow"], default=["fedseg", "mlflow"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave results and BENCHMARKS.md")
    args = parser.parse_args()

    from imaging.spec import ModelSpec

    spec = ModelSpec()
    tmp = Path(tempfile.mkdtemp(prefix="fedseg-serving-bench-"))
    home = tmp / "home"
    os.environ["FEDSEG_HOME"] = str(home)
    os.environ.update(FEDSEG_SERVE_AUTH="off", FEDSEG_SERVE_DEVICE="cpu")  # loopback, CPU
    for var in ("FEDSEG_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    load_before = os.getloadavg()
    try:
        from registry import default_store

        uri = publish(home, spec)
        paths = write_series(tmp / "series", args.slices, args.size)
        body, content_type = multipart(paths)
        bare = bare_forward(uri, paths, args.repeats)
        print(f"bare forward {1000 * bare['forward_s']:.1f} ms, pipeline {1000 * bare['pipeline_s']:.1f} ms",
              flush=True)
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FEDSEG_SERVE_AUTH": "off", "FEDSEG_SERVE_DEVICE": "cpu",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # mlflow execs `uvicorn`
        results: dict[str, list[dict]] = {}
        if "fedseg" in args.servers:
            port = _free_port()
            fedseg_argv = [str(BIN / "fedseg"), "serve", "--model", uri, "--port", str(port),
                           "--log-level", "warning"]
            with Server("fedseg", fedseg_argv, env, f"http://127.0.0.1:{port}/health/ready", tmp / "fedseg.log"):
                results["fedseg"] = run_levels("fedseg", f"http://127.0.0.1:{port}/v1/predict", body,
                                               content_type, args.concurrency, args.requests, '"score"',
                                               metrics_url=f"http://127.0.0.1:{port}/metrics")
        if "mlflow" in args.servers:
            port = _free_port()
            mlflow_env = {**env, "MLFLOW_TRACKING_URI": default_store().tracking_uri}
            mlflow_argv = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                           "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
            with Server("mlflow", mlflow_argv, mlflow_env, f"http://127.0.0.1:{port}/ping", tmp / "mlflow.log"):
                results["mlflow"] = run_levels("mlflow", f"http://127.0.0.1:{port}/invocations",
                                               mlflow_body(paths, spec), "application/json",
                                               args.concurrency, args.requests, "predictions")
        payload = {
            "date": now(), "machine": machine(), "command": command_line(), "code_version": git_version(),
            "json": "bench/results/serving.json", "model_uri": uri,
            "spec": {"channels": list(spec.channels), "image_size": spec.image_size},
            "series": {"slices": args.slices, "size": args.size, "bytes": sum(p.stat().st_size for p in paths)},
            "requests": args.requests, "repeats": args.repeats, "bare": bare, "results": results,
            "servers": {"fedseg": "`fedseg serve` (DICOM in, mask out)",
                        "mlflow": "`mlflow models serve` (tensor in, probabilities out)"},
            "fedseg_settings": served_settings(uri),
            "notes": [f"Load average (1, 5, 15 min) when the run started: "
                      f"{', '.join(f'{v:.2f}' for v in load_before)} on {os.cpu_count()} cores."],
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
