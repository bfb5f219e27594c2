"""The model as the service runs it: a rebuilt U-Net, its spec, and the triage rule."""

from __future__ import annotations

import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from imaging.model import load_state_dict, select_device
from imaging.preprocess import preprocess_image, restore_probabilities
from imaging.spec import ModelSpec
from imaging.training import predict_probabilities
from imaging.volume import Volume
from registry.load import LoadedModel

from .batching import BatchStats, MicroBatcher
from .compiled import ForwardMode, compile_for_inference, warm_batch_sizes
from .metrics import observe_stage

__all__ = ["Prediction", "Predictor", "Status", "triage_score"]

Status = Literal["suspect", "normal"]


@dataclass(frozen=True)
class Prediction:
    """One series' result, in the input's geometry.

    Attributes
    ----------
    mask : np.ndarray
        uint8 ``(slices, rows, cols)``, 1 where the lesion probability is at least
        ``spec.threshold``.
    score : float
        Probability in [0, 1] that the series holds a lesion (see :func:`triage_score`).
    status : {"suspect", "normal"}
        ``"suspect"`` when ``score >= spec.triage_threshold``.
    slice_scores : np.ndarray
        float32 ``(slices,)``: each slice's score; ``score`` is their maximum.
    timings : dict[str, float]
        Seconds of each stage: ``preprocess``, ``forward`` (the micro-batch this series was in)
        and ``postprocess``.
    """

    mask: np.ndarray
    score: float
    status: Status
    slice_scores: np.ndarray
    timings: dict[str, float] = field(default_factory=dict, compare=False)


def triage_score(probs: np.ndarray, min_lesion_pixels: int) -> tuple[float, np.ndarray]:
    """Series score and per-slice scores from voxel probabilities ``(slices, rows, cols)``.

    A slice's score is the mean of its ``min_lesion_pixels`` highest probabilities (all of them
    when the slice is smaller), so one hot pixel does not flag a series; the series score is the
    highest slice score.
    """
    flat = np.asarray(probs, dtype=np.float32).reshape(probs.shape[0], -1)
    k = max(1, min(int(min_lesion_pixels), flat.shape[1]))
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:]
    per_slice = top.mean(axis=1, dtype=np.float64).astype(np.float32)
    return float(np.clip(per_slice.max(), 0.0, 1.0)), per_slice


class Predictor:
    """A registered model rebuilt for inference.

    The network is rebuilt from ``model.spec`` by the factory that trained it, loaded strictly,
    moved to ``device``, compiled when ``compile_forward`` (:mod:`serving.compiled`; the eager
    network when compiling fails, see :attr:`forward_mode`) and run on blank slices (warm-up), so
    that the first request does not pay for lazy initialisation or compilation. :meth:`predict`
    is thread-safe: pre- and post-processing run concurrently, while the forwards of concurrent
    requests are micro-batched (:class:`serving.batching.MicroBatcher`) and serialised.

    Threads: the forward always runs on one thread, ``runner``'s (the app shares one between its
    models), with torch's intra-op threads (``threads``, default: what torch chose, one per
    core); pre- and post-processing, which run in several request threads at once, use one
    intra-op thread each. torch's thread count is a per-thread OpenMP setting: every thread that
    runs a forward with more than one keeps its own team of OpenMP workers, and a second team
    spinning beside the first halves the forward's speed on a small machine (measured: 3.8 ms
    on the main thread, 9-10 ms from a request thread, for the default U-Net on 16 slices).
    The one exception is the compiling warm-up, on a thread that ends with it, its team too.

    Parameters
    ----------
    model : registry.LoadedModel
        Weights, spec and identity of a registered version.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"`` (see :func:`imaging.model.select_device`).
    batch_size : int
        Slices per network call.
    max_batch_slices : int
        Most slices of concurrent requests combined into one forward.
    max_wait_ms : float
        Longest wait of a request for announced concurrent requests to join its batch.
    threads : int, optional
        Intra-op threads of the forward on the CPU (default: ``torch.get_num_threads()``).
    runner : concurrent.futures.Executor, optional
        A single-thread executor that runs every forward (default: one of its own).
    compile_forward : bool
        Compile the network with ``torch.compile`` (default: eager).

    Attributes
    ----------
    forward_mode : {"compiled", "eager"}
        How the forward runs.
    forward_detail : str
        Why it is eager although ``compile_forward`` asked for compiling; empty otherwise.

    Raises
    ------
    imaging.errors.ConfigError
        The weights do not match the spec, or the device is unavailable.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str = "auto",
        batch_size: int = 32,
        max_batch_slices: int = 64,
        max_wait_ms: float = 2.0,
        threads: int | None = None,
        runner: Executor | None = None,
        compile_forward: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.name = model.name
        self.version = model.version
        self.spec: ModelSpec = model.spec
        self.device = select_device(device)
        self.batch_size = batch_size
        self._runner = runner or ThreadPoolExecutor(1, thread_name_prefix="fedseg-forward")
        # built on the runner too: torch work with several threads anywhere else would start a
        # second OpenMP team (see the class notes)
        self._net, self._threads = self._runner.submit(self._build, model, threads).result()
        self.forward_mode: ForwardMode = "eager"
        self.forward_detail = ""
        if compile_forward:  # compiles in a thread of its own: the runner goes on serving
            compiled = compile_for_inference(self._net, self._warm)
            self._net, self.forward_mode, self.forward_detail = compiled.net, compiled.mode, compiled.detail
        self._batcher = MicroBatcher(
            self._forward, executor=self._runner, max_slices=max_batch_slices,
            max_wait_s=max_wait_ms / 1000.0, on_batch=self._observe_batch,
        )
        # warm-up: one dummy forward, outside the batcher (not counted in its stats)
        blank = np.zeros((1, self.spec.image_size, self.spec.image_size), np.float32)
        self._runner.submit(self._forward, blank).result()

    @property
    def stats(self) -> BatchStats:
        """Micro-batching counters: forwards, requests and slices so far."""
        return self._batcher.stats

    @property
    def waiting(self) -> int:
        """Requests queued for this model's next forward."""
        return self._batcher.waiting

    def _observe_batch(self, seconds: float, requests: int, slices: int) -> None:
        observe_stage("forward", seconds, self.version)

    def _build(self, model: LoadedModel, threads: int | None) -> tuple[torch.nn.Module, int]:
        """The network and the forward's thread count (default: the runner thread's own)."""
        threads = max(1, int(threads or torch.get_num_threads()))
        torch.set_num_threads(threads)
        return load_state_dict(model.spec, model.state_dict).to(self.device).eval(), threads

    def _warm(self, net: torch.nn.Module) -> None:
        """One forward of each batch shape ``net`` will meet (compiles them all)."""
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            for slices in warm_batch_sizes(self.batch_size):
                blank = np.zeros((slices, self.spec.image_size, self.spec.image_size), np.float32)
                predict_probabilities(net, blank, device=self.device, batch_size=self.batch_size)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        """The forward; called on the runner's thread only (see the class notes)."""
        with torch.inference_mode():
            if torch.get_num_threads() != self._threads:  # the runner's OpenMP team: all cores
                torch.set_num_threads(self._threads)
            return predict_probabilities(
                self._net, images, device=self.device, batch_size=self.batch_size
            )

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """Probabilities ``(n, S, S)`` for preprocessed slices ``(n, S, S)`` (the Open Inference
        Protocol path: no DICOM, no pre- or post-processing), micro-batched like :meth:`predict`,
        and the seconds of the forward that computed them. Awaited on the event loop: the
        request hands its slices straight to the forward thread."""
        return await self._batcher.run_async(np.ascontiguousarray(images, dtype=np.float32))

    def predict(self, volume: Volume) -> Prediction:
        """Segment and triage one series.

        Raises
        ------
        imaging.errors.DataError
            The pixels cannot be preprocessed (empty, NaN or infinite values).
        """
        _, rows, cols = volume.shape
        if torch.get_num_threads() != 1:  # concurrent requests: one thread each (class notes)
            torch.set_num_threads(1)
        with self._batcher.ticket() as ticket:
            start = time.perf_counter()
            images = preprocess_image(volume.pixels, self.spec)
            preprocess_s = time.perf_counter() - start
            observe_stage("preprocess", preprocess_s, self.version)
            out, forward_s = self._batcher.run_timed(images, ticket)  # observes "forward" per batch
        start = time.perf_counter()
        probs = restore_probabilities(out, rows, cols)
        score, per_slice = triage_score(probs, self.spec.min_lesion_pixels)
        status: Status = "suspect" if score >= self.spec.triage_threshold else "normal"
        mask = (probs >= self.spec.threshold).astype(np.uint8)
        postprocess_s = time.perf_counter() - start
        observe_stage("postprocess", postprocess_s, self.version)
        return Prediction(mask=mask, score=score, status=status, slice_scores=per_slice,
                          timings={"preprocess": preprocess_s, "forward": forward_s,
                                   "postprocess": postprocess_s})
