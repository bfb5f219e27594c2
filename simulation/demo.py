"""`make demo`: synthetic hospitals -> federation -> registry -> inference service -> one answer.

Run with ``python -m simulation.demo``. Everything lands in ``$FEDSEG_HOME`` (default
``~/.fedseg``), which stays behind for ``fedseg serve`` and the MLflow UI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import numpy as np

from imaging.dicom_read import read_series
from imaging.dicom_seg import read_seg_mask
from imaging.home import fedseg_home
from imaging.metrics import dice_score
from imaging.site_folder import scan_site

from .engine import run_simulated_federation
from .run_command import configure_logging
from .synthetic import write_synthetic_sites

MODEL = "fedseg-unet"
DEMO_RUN_CONFIG = (
    "num-server-rounds=6 local-epochs=2 batch-size=8 learning-rate=0.01 "
    f"image-size=64 unet-channels='8,16,32' model-name='{MODEL}'"
)


def _step(n: int, text: str) -> None:
    click.secho(f"\n[{n}/5] {text}", bold=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decode_rle(runs: list[int], shape: list[int]) -> np.ndarray:
    values = np.arange(len(runs)) % 2
    return np.repeat(values, runs).astype(np.uint8).reshape(shape)


def _wait_ready(base: str, service: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise click.ClickException(f"the service exited with code {service.returncode}")
        try:
            r = httpx.get(f"{base}/health/ready", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"the service was not ready after {timeout:.0f} s")


def _api_key(home: Path) -> str:
    """A fresh ``predict,monitor`` API key for the demo (``fedseg serve apikey create``)."""
    env = {**os.environ, "FEDSEG_HOME": str(home)}
    fedseg = [sys.executable, "-m", "fedseg.cli", "serve", "apikey"]
    subprocess.run([*fedseg, "revoke", "demo"], env=env, capture_output=True)  # from an earlier demo
    created = subprocess.run([*fedseg, "create", "demo", "--scopes", "predict,monitor"], env=env,
                             check=True, capture_output=True, text=True)
    key = created.stdout.strip().splitlines()[-1]
    click.echo(f"  API key 'demo' created (shown once, stored hashed): {key[:16]}...")
    return key


def main() -> None:
    home = fedseg_home()
    configure_logging(verbose=False)
    demo = home / "demo"
    sites_dir, query_dir = demo / "sites", demo / "query"
    for folder in (sites_dir, query_dir):
        shutil.rmtree(folder, ignore_errors=True)
    click.secho(f"fedseg demo: state in FEDSEG_HOME={home}", bold=True)

    _step(1, f"Writing 3 synthetic hospitals as DICOM series + SEG into {sites_dir}")
    for site in write_synthetic_sites(sites_dir, sites=3, patients_per_site=8, slices=16, size=64, seed=1):
        info = json.loads((site / "site.json").read_text()) if (site / "site.json").exists() else {}
        click.echo(f"  {site.name}: {info.get('manufacturer', '?')} {info.get('modality', '')}")

    _step(2, "Federated training with Flower's simulation engine (3 virtual hospitals)")
    click.echo(f"  run config: {DEMO_RUN_CONFIG}")
    started = time.monotonic()
    run_simulated_federation(sites_dir, run_config=DEMO_RUN_CONFIG)
    click.echo(f"  federation finished in {time.monotonic() - started:.0f} s")

    _step(3, "Model Registry")
    subprocess.run([sys.executable, "-m", "fedseg.cli", "registry", "list", "--name", MODEL], check=True)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    _step(4, f"Starting the inference service on {base} (models:/{MODEL}@champion)")
    key = _api_key(home)
    service = subprocess.Popen(
        [sys.executable, "-m", "fedseg.cli", "serve", "--model", f"models:/{MODEL}@champion",
         "--host", "127.0.0.1", "--port", str(port), "--audit-log", str(demo / "audit.log")],
        env={**os.environ, "FEDSEG_HOME": str(home)},
    )
    try:
        ready = _wait_ready(base, service)
        click.echo(f"  ready: {ready}")

        _step(5, "POST /v1/predict with a new series the federation never saw")
        (query_site,) = write_synthetic_sites(query_dir, sites=1, patients_per_site=1, slices=16,
                                              size=64, seed=2024)
        (case,) = scan_site(query_site).cases
        files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in case.files]
        refused = httpx.post(f"{base}/v1/predict", files=files, timeout=120.0)
        click.echo(f"  without the key: {refused.status_code} {refused.json().get('detail', '')}")
        response = httpx.post(f"{base}/v1/predict", files=files, timeout=120.0,
                              headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 200:
            raise click.ClickException(f"predict answered {response.status_code}: {response.text}")
        answer = response.json()
        shown = {**answer, "mask": {**answer["mask"], "rle": answer["mask"]["rle"][:8] + ["..."]}}
        click.echo(json.dumps(shown, indent=2))
        mask = _decode_rle(answer["mask"]["rle"], answer["mask"]["shape"])
        truth = read_seg_mask(case.seg_file, read_series(case.files)) if case.seg_file else None
        if truth is not None:
            click.echo(f"  Dice of the returned mask against this series' SEG: {dice_score(mask, truth):.3f}"
                       f" ({int(truth.sum())} lesion voxels in the truth, {int(mask.sum())} predicted)")
    finally:
        service.terminate()
        service.wait(timeout=30)

    click.secho("\nDone.", bold=True)
    click.echo(f"  Serve the champion again:  fedseg serve --model models:/{MODEL}@champion --port 8080")
    click.echo("  Give a client a key:       fedseg serve apikey create NAME --scopes predict  "
               "(then Authorization: Bearer <key>)")
    click.echo(f"  The service's audit lines: {demo / 'audit.log'}")
    click.echo(f"  Open the MLflow UI:        mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db "
               f"--port 5000   (then http://127.0.0.1:5000)")


if __name__ == "__main__":
    try:
        main()
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
