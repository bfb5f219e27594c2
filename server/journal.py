"""The coordinator's crash-consistent run journal.

One folder per run under ``$FEDSEG_HOME/journal/<run_id>/``:

- ``round-NNNN.pt``: after round N, the global weights, the strategy's state (FedAdam's
  moments...), the RNG states and what the run has gathered for its lineage. Tensors and plain
  containers only, loaded with ``torch.load(weights_only=True)``: no pickle is executed.
- ``journal.json``: status, the run config, the rounds completed, the last evaluation, the
  sites' privacy-ledger references and the checkpoint of the last completed round.

Every file is written to a temporary name, fsynced and renamed over the old one, checkpoint
first and ``journal.json`` second: a crash at any instant leaves the previous round's journal
or the new one, never a torn file. A round is counted once: ``rounds_completed`` is rewritten
from the checkpoint's own history, never appended to.
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imaging.home import fedseg_home

from .errors import JournalError

__all__ = ["RoundCheckpoint", "RunJournal", "journal_root", "list_runs", "capture_rng", "restore_rng"]

JOURNAL_FILE = "journal.json"
_KEEP_CHECKPOINTS = 2
STATUSES = ("running", "completed", "failed", "interrupted")


def journal_root() -> Path:
    return fedseg_home() / "journal"


@dataclass
class RoundCheckpoint:
    """Everything needed to continue after ``server_round``."""

    server_round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    round_log: dict[str, Any] = field(default_factory=dict)
    rounds_completed: list[int] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(np.array(keys)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


def restore_rng(state: Mapping[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(file object)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunJournal:
    """The journal of one coordinator run (see the module docstring)."""

    def __init__(self, folder: Path, data: dict[str, Any]) -> None:
        self.folder, self.data = folder, data

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    @classmethod
    def create(cls, run_id: str, *, run_config: Mapping[str, Any], num_rounds: int, model_name: str,
               strategy: str, root: Path | None = None) -> RunJournal:
        folder = (root or journal_root()) / run_id
        if (folder / JOURNAL_FILE).exists():
            raise JournalError(f"a journal for run {run_id} already exists at {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        journal = cls(folder, {
            "run_id": run_id, "status": "running", "created": now, "updated": now,
            "pid": os.getpid(), "host": socket.gethostname(), "num_rounds": num_rounds,
            "model_name": model_name, "strategy": strategy, "run_config": dict(run_config),
            "rounds_completed": [], "last_completed_round": 0, "checkpoint": None,
            "metrics": {}, "site_ledgers": {}, "resumes": [], "published_version": None, "error": None,
        })
        journal._save()
        return journal

    @classmethod
    def open(cls, run_id: str, root: Path | None = None) -> RunJournal:
        folder = (root or journal_root()) / run_id
        path = folder / JOURNAL_FILE
        if not path.is_file():
            known = ", ".join(r["run_id"] for r in list_runs(root)) or "none"
            raise JournalError(f"no journal for run {run_id!r} under {folder.parent} (runs: {known})")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JournalError(f"journal {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("run_id") != run_id:
            raise JournalError(f"journal {path} does not belong to run {run_id}")
        return cls(folder, data)

    # -- state ------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``running`` only while its process lives on this host; else ``interrupted``."""
        status = str(self.data.get("status"))
        if status == "running" and self.data.get("host") == socket.gethostname() \
                and not _pid_alive(int(self.data.get("pid", 0))):
            return "interrupted"
        return status

    def summary(self) -> dict[str, Any]:
        d = self.data
        return {"run_id": d["run_id"], "status": self.status, "model_name": d.get("model_name"),
                "strategy": d.get("strategy"), "num_rounds": d.get("num_rounds"),
                "last_completed_round": d.get("last_completed_round", 0),
                "rounds_completed": list(d.get("rounds_completed", [])),
                "metrics": dict(d.get("metrics", {})), "published_version": d.get("published_version"),
                "resumes": list(d.get("resumes", [])), "error": d.get("error"),
                "created": d.get("created"), "updated": d.get("updated")}

    def check_resumable(self, run_config: Mapping[str, Any]) -> None:
        """Refuse to resume a finished or live run, or with another run config."""
        status = self.status
        if status == "completed":
            raise JournalError(f"run {self.run_id} is completed (published version "
                               f"{self.data.get('published_version')}); nothing to resume")
        if status == "running":
            raise JournalError(f"run {self.run_id} is still running (pid {self.data.get('pid')} on "
                               f"{self.data.get('host')}); stop it before resuming")
        before = {k: v for k, v in self.data.get("run_config", {}).items() if k != "resume-run"}
        now = {k: v for k, v in run_config.items() if k != "resume-run"}
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise JournalError(
                f"run {self.run_id} was started with another run config; differing key(s): "
                + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed)
                + ". Resume with `fedseg coordinator resume` or `fedseg simulate run --resume`, "
                "which reuse the journaled config"
            )

    def mark_resumed(self, at_round: int) -> None:
        self.data.update(status="running", pid=os.getpid(), host=socket.gethostname(), error=None)
        self.data.setdefault("resumes", []).append({"after_round": at_round, "time": time.time()})
        self._save()

    def finish(self, status: str, *, error: str | None = None, published_version: int | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown journal status {status!r}")
        self.data.update(status=status, error=error)
        if published_version is not None:
            self.data["published_version"] = published_version
        self._save()

    # -- rounds -----------------------------------------------------------------------------
    def record_round(self, checkpoint: RoundCheckpoint, *, metrics: Mapping[str, float],
                     site_ledgers: Mapping[str, Any]) -> None:
        """Checkpoint first, then the journal that points at it; old checkpoints pruned last."""
        name = f"round-{checkpoint.server_round:04d}.pt"
        payload = {"server_round": checkpoint.server_round, "arrays": checkpoint.arrays,
                   "strategy_state": {n: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()}
                                      for n, s in checkpoint.strategy_state.items()},
                   "rng": checkpoint.rng, "round_log": json.dumps(checkpoint.round_log),
                   "rounds_completed": list(checkpoint.rounds_completed)}
        _atomic_write(self.folder / name, lambda f: torch.save(payload, f))
        self.data.update(checkpoint=name, last_completed_round=checkpoint.server_round,
                         rounds_completed=list(checkpoint.rounds_completed),
                         metrics={k: float(v) for k, v in metrics.items()},
                         site_ledgers=dict(site_ledgers))
        self._save()
        keep = {f"round-{r:04d}.pt" for r in checkpoint.rounds_completed[-_KEEP_CHECKPOINTS:]}
        for old in self.folder.glob("round-*.pt"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def latest(self) -> RoundCheckpoint | None:
        """The last completed round's checkpoint, or None before round 1 completed."""
        name = self.data.get("checkpoint")
        if not name:
            return None
        path = self.folder / name
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for a damaged file
            raise JournalError(f"checkpoint {path} of run {self.run_id} is unreadable: {exc}") from exc
        if raw.get("server_round") != self.data.get("last_completed_round"):
            raise JournalError(f"checkpoint {path} is round {raw.get('server_round')}, the journal "
                               f"says {self.data.get('last_completed_round')}")
        return RoundCheckpoint(
            server_round=int(raw["server_round"]), arrays=dict(raw["arrays"]),
            strategy_state={n: {k: v.numpy() for k, v in s.items()} for n, s in raw["strategy_state"].items()},
            rng=raw["rng"], round_log=json.loads(raw["round_log"]),
            rounds_completed=[int(r) for r in raw["rounds_completed"]],
        )

    def _save(self) -> None:
        self.data["updated"] = time.time()
        text = json.dumps(self.data, indent=2, sort_keys=True, default=str).encode()
        _atomic_write(self.folder / JOURNAL_FILE, lambda f: f.write(text))


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """Every journaled run, newest first; unreadable journals are listed with status ``corrupt``."""
    root = root or journal_root()
    runs = []
    for path in sorted(root.glob(f"*/{JOURNAL_FILE}")) if root.is_dir() else []:
        try:
            runs.append(RunJournal.open(path.parent.name, root).summary())
        except JournalError as exc:
            runs.append({"run_id": path.parent.name, "status": "corrupt", "error": str(exc)})
    return sorted(runs, key=lambda r: r.get("created") or 0, reverse=True)
