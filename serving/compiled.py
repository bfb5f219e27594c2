"""The served U-Net compiled with ``torch.compile`` (TorchInductor), the eager network its fallback.

Compiled, the forward is 25-35% faster on this project's CPU machine (``make bench-serving``
measures both). The price is paid once per model load, before the version is swapped in: 30-40 s
for the first architecture on 2 cores with an empty compile cache, a few seconds with a warm one
(TorchInductor's cache, ``TORCHINDUCTOR_CACHE_DIR``), well under a second for another version of
an architecture already compiled in the process (the weights are inputs of the compiled graph).

Shapes: the batch dimension is marked dynamic, so one graph serves a whole range of batch sizes.
torch still specialises a batch of 1, and ATen's choice of convolution backend (oneDNN from 16
slices up on the CPU), so the warm-up runs one batch of each of :func:`warm_batch_sizes`: once
warm, a forward never compiles while requests wait on it.

Compiling needs a C++ compiler on the CPU (Triton on a GPU). When it fails, for any reason, the
eager network serves and :class:`ForwardNet` says why: a slower service, never a failed load.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["CompiledNet", "ForwardMode", "ForwardNet", "compile_for_inference", "warm_batch_sizes"]

log = logging.getLogger(__name__)

ForwardMode = Literal["compiled", "eager"]

#: Graphs dynamo keeps per code object before it stops compiling (torch's default is 8): every
#: architecture served in a process adds three (see the module notes).
RECOMPILE_LIMIT = 64


class CompiledNet(torch.nn.Module):
    """``net`` under ``torch.compile``, its batch dimension dynamic.

    ``net`` stays the only submodule (``parameters()``, ``.to()``, ``.eval()`` reach it once);
    the compiled wrapper shares its parameters.
    """

    def __init__(self, net: torch.nn.Module, backend: str | Callable[..., Any] = "inductor") -> None:
        super().__init__()
        self.net = net
        object.__setattr__(self, "_compiled", torch.compile(net, backend=backend))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(x, 0)
        return self._compiled(x)


@dataclass(frozen=True)
class ForwardNet:
    """The network a predictor runs, and how.

    Attributes
    ----------
    net : torch.nn.Module
        :class:`CompiledNet`, or the eager network.
    mode : {"compiled", "eager"}
    detail : str
        Why the network is eager although compiling was asked for; empty otherwise.
    """

    net: torch.nn.Module
    mode: ForwardMode
    detail: str = ""


def warm_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """A batch of each shape class a forward of at most ``batch_size`` slices can meet."""
    return tuple(sorted({1, min(2, batch_size), min(16, batch_size), batch_size}))


def _configure_compiler() -> None:
    import torch._dynamo.config
    import torch._inductor.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # compile in this process: no pool of compile worker processes living on in the service
        torch._inductor.config.compile_threads = 1


def compile_for_inference(
    net: torch.nn.Module,
    warm: Callable[[torch.nn.Module], None],
    *,
    backend: str | Callable[..., Any] = "inductor",
) -> ForwardNet:
    """Compile ``net`` and run ``warm`` on it (which compiles the graphs) in a thread of its own.

    The thread ends with the warm-up, and the OpenMP workers its forwards started end with it:
    the thread that serves the forwards keeps the only team (see :class:`serving.Predictor`).
    It runs in a copy of the caller's context: torch's compiler settings are context variables.

    Parameters
    ----------
    net : torch.nn.Module
        The eager network, in eval mode on its device.
    warm : callable
        Runs the compiled network on a batch of each of :func:`warm_batch_sizes`.
    backend : str or callable
        ``torch.compile``'s backend.

    Returns
    -------
    ForwardNet
        Compiled and warm; or ``net`` itself, eager, with the compiler's error as ``detail``.
    """
    outcome: dict[str, ForwardNet] = {}

    def run() -> None:
        try:
            _configure_compiler()
            compiled = CompiledNet(net, backend=backend)
            warm(compiled)
            outcome["net"] = ForwardNet(compiled, "compiled")
        except Exception as exc:  # noqa: BLE001 (any compiler failure: serve eager, say why)
            detail = f"torch.compile failed, serving the eager network: {type(exc).__name__}: {exc}"
            outcome["net"] = ForwardNet(net, "eager", detail[:2000])

    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), name="fedseg-compile", daemon=True)
    thread.start()
    thread.join()
    result = outcome["net"]
    if result.detail:
        log.warning("%s", result.detail)
    return result
