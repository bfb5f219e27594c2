"""Shared helpers for benchmark scripts: machine facts and the BENCHMARKS.md table writer."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> dict[str, object]:
    import torch

    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def git_version() -> str:
    """HEAD's short hash, with "+uncommitted" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+uncommitted" if dirty else head


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def header(payload: dict) -> str:
    m = payload["machine"]
    gpu = m["gpu"] or "no GPU"
    return (
        f"- Date: {payload['date']}  \n"
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}; "
        f"Python {m['python']}, torch {m['torch']}  \n"
        f"- Command: `{payload['command']}`  \n"
        f"- Code: {payload['code_version']}  \n"
        f"- Raw results: `{payload['json']}`\n"
    )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def update_section(section: str, body: str) -> None:
    """Replace (or append) the ``## section`` of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nEvery table here is written by a script in `bench/`; rerun it to refresh.\n"
    block = f"## {section}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    BENCHMARKS_MD.write_text(text)


def evaluate_sites(net, data: dict, device) -> dict[str, float]:
    """Dice of ``net`` on each site's held-out slices, pooled over all voxels, mean and worst."""
    import numpy as np

    from imaging.metrics import DiceCounts
    from imaging.training import evaluate

    scores, pooled = {}, DiceCounts()
    for site, d in data.items():
        r = evaluate(net, d.test_images, d.test_masks, device=device)
        scores[site] = r.dice
        pooled = pooled.merge(r.counts)
    scores["pooled"] = pooled.dice
    per_site = [scores[s] for s in data]
    scores["mean"] = float(np.mean(per_site))
    scores["worst"] = float(min(per_site))
    return scores
