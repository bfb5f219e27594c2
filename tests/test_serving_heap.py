"""``create_app(freeze_heap=True)`` (what ``fedseg serve`` runs): once the model is loaded, the
start-up heap is out of the garbage collector's reach, and requests still answer.

Run in a fresh interpreter: freezing is for a process that serves one app, not for pytest's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import gc, sys
    sys.path.insert(0, {tests!r})
    from fastapi.testclient import TestClient
    from serving_fixtures import URI, parts, tiny_model, write_tiny_series
    from serving import ServingSettings, create_app

    model = tiny_model()
    settings = ServingSettings(model_uri=URI, device="cpu", auth="off", reload_seconds=0)
    app = create_app(settings, loader=lambda uri: model, freeze_heap={freeze})
    before = gc.get_freeze_count()
    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        files = parts(write_tiny_series(__import__("pathlib").Path({tmp!r}), "heap"))
        status = client.post("/v1/predict", files=files).status_code
    print(before, frozen, status)
    """
)


def _run(tmp_path: Path, freeze: bool) -> tuple[int, int, int]:
    code = SCRIPT.format(tests=str(Path(__file__).parent), freeze=freeze, tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, frozen, status = map(int, done.stdout.split()[-3:])
    return before, frozen, status


def test_the_served_process_freezes_its_start_up_heap(tmp_path: Path) -> None:
    before, frozen, status = _run(tmp_path, freeze=True)
    assert before == 0 and frozen > 100_000  # torch, MLflow, the model: hundreds of thousands
    assert status == 200


def test_apps_built_in_a_shared_process_freeze_nothing(tmp_path: Path) -> None:
    assert _run(tmp_path, freeze=False) == (0, 0, 200)
