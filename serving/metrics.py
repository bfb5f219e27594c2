"""Prometheus metrics of the service, one registry per app.

Each app built by :func:`serving.create_app` owns a :class:`ServingMetrics` (``app.state.metrics``)
with its own :class:`prometheus_client.CollectorRegistry`, exposed at ``GET /metrics``: nothing is
registered in prometheus-client's global registry, so two apps (two tests) never share a value.

The module-level functions (:func:`observe_stage`, :func:`record_request`, :func:`set_model_info`,
:func:`count_reload`, :func:`set_queue_depth`) are the seam other modules call. They act on the
metrics of the app whose code is running: :class:`MetricsMiddleware` binds the app's metrics in a
context variable for every request and for the lifespan, so routes, the threadpool
(``run_in_threadpool`` copies the context) and tasks started by the lifespan find them. Code that
runs where no app is bound (a bare ``threading.Thread``) reaches the metrics of the one app whose
lifespan is running, or, when none or several are, records nothing; such code can also call the
methods of ``app.state.metrics`` directly, or run inside :func:`bound`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .drift import DriftMonitor

__all__ = [
    "CONTENT_TYPE",
    "MetricsMiddleware",
    "ServingMetrics",
    "bound",
    "count_reload",
    "current",
    "observe_stage",
    "record_request",
    "set_model_info",
    "set_queue_depth",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
NAMESPACE = "fedseg"
UNMATCHED_ROUTE = "<unmatched>"  # one label for every 404, so scanners do not grow the series
#: The response header that names the model version that answered (every prediction route).
MODEL_VERSION_HEADER = "X-Model-Version"
_VERSION_HEADER = MODEL_VERSION_HEADER.lower().encode()


def answered_version(message: Message) -> int | None:
    """The model version named by an ASGI ``http.response.start`` message, if any."""
    for key, value in message.get("headers", ()):
        if key.lower() == _VERSION_HEADER and value.isdigit():
            return int(value)
    return None

# request latencies run from a health probe (ms) to a large series on the CPU (tens of seconds)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _version(version: int | None) -> str:
    return "" if version is None else str(int(version))


class ServingMetrics:
    """The metrics of one app, in their own registry.

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        What ``GET /metrics`` renders.
    drift : DriftMonitor or None
        The app's input-drift window (:mod:`.drift`), reached through :func:`current`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "requests", "HTTP requests answered, by route template, method, status and model version",
            ["route", "method", "status", "version"], namespace=NAMESPACE, registry=r,
        )
        self._latency = Histogram(
            "request_duration_seconds", "Time from request to the last byte of the response",
            ["route", "method"], namespace=NAMESPACE, buckets=_BUCKETS, registry=r,
        )
        self._stages = Histogram(
            "stage_duration_seconds",
            "Time spent in one stage of a prediction (read, preprocess, forward, encode, ...)",
            ["stage", "version"], namespace=NAMESPACE, buckets=_BUCKETS, registry=r,
        )
        self._model_info = Gauge(
            "model_info", "1 for each model version being served, by role (champion, challenger)",
            ["name", "version", "role"], namespace=NAMESPACE, registry=r,
        )
        self._reloads = Counter(
            "model_reloads", "Model (re)loads, by outcome", ["outcome"], namespace=NAMESPACE, registry=r,
        )
        self._queue = Gauge(
            "queue_depth", "Jobs or requests waiting to be processed", namespace=NAMESPACE, registry=r,
        )
        self.drift: DriftMonitor | None = None
        self._roles: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the agreed seam

    def observe_stage(self, stage: str, seconds: float, version: int | None = None) -> None:
        """Time spent in one ``stage`` of a prediction by model ``version``."""
        self._stages.labels(stage=stage, version=_version(version)).observe(max(0.0, seconds))

    def record_request(
        self, route: str, method: str, status: int, version: int | None, seconds: float
    ) -> None:
        """One answered request (the middleware calls this for every request)."""
        self._requests.labels(
            route=route, method=method.upper(), status=str(int(status)), version=_version(version)
        ).inc()
        self._latency.labels(route=route, method=method.upper()).observe(max(0.0, seconds))

    def set_model_info(self, name: str, version: int | None, role: str) -> None:
        """Say that ``name`` ``version`` serves as ``role``; ``version=None`` clears the role."""
        with self._lock:
            old = self._roles.pop(role, None)
            if old is not None:
                self._model_info.remove(old[0], old[1], role)
            if version is not None:
                labels = (name, _version(version))
                self._model_info.labels(name, labels[1], role).set(1)
                self._roles[role] = labels

    def count_reload(self, outcome: str) -> None:
        """One model (re)load attempt that ended in ``outcome`` (``ok``, ``failed``, ...)."""
        self._reloads.labels(outcome=outcome).inc()

    def set_queue_depth(self, n: int) -> None:
        """How many jobs or requests wait now."""
        self._queue.set(max(0, int(n)))

    # ------------------------------------------------------------------ plumbing

    def register(self, collector: Collector) -> None:
        """Add a custom collector (read at scrape time) to this app's registry."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)


# ---------------------------------------------------------------------- which app's metrics

_current: ContextVar[ServingMetrics | None] = ContextVar("fedseg_serving_metrics", default=None)
_running: list[ServingMetrics] = []  # apps whose lifespan runs; a fallback for unbound threads
_running_lock = threading.Lock()


def current() -> ServingMetrics | None:
    """The metrics of the app whose code is running, or None."""
    metrics = _current.get()
    if metrics is not None:
        return metrics
    with _running_lock:
        return _running[0] if len(_running) == 1 else None


@contextmanager
def bound(metrics: ServingMetrics) -> Iterator[ServingMetrics]:
    """Run a block (a worker thread's loop, say) with ``metrics`` as the current metrics."""
    token = _current.set(metrics)
    try:
        yield metrics
    finally:
        _current.reset(token)


def observe_stage(stage: str, seconds: float, version: int | None = None) -> None:
    """:meth:`ServingMetrics.observe_stage` on the current app's metrics."""
    if (m := current()) is not None:
        m.observe_stage(stage, seconds, version)


def record_request(route: str, method: str, status: int, version: int | None, seconds: float) -> None:
    """:meth:`ServingMetrics.record_request` on the current app's metrics."""
    if (m := current()) is not None:
        m.record_request(route, method, status, version, seconds)


def set_model_info(name: str, version: int | None, role: str) -> None:
    """:meth:`ServingMetrics.set_model_info` on the current app's metrics."""
    if (m := current()) is not None:
        m.set_model_info(name, version, role)


def count_reload(outcome: str) -> None:
    """:meth:`ServingMetrics.count_reload` on the current app's metrics."""
    if (m := current()) is not None:
        m.count_reload(outcome)


def set_queue_depth(n: int) -> None:
    """:meth:`ServingMetrics.set_queue_depth` on the current app's metrics."""
    if (m := current()) is not None:
        m.set_queue_depth(n)


# ---------------------------------------------------------------------- middleware


def _route_template(scope: Scope) -> str:
    """The matched route's template; when a middleware answered before routing (401, 413), the
    route the path would have reached; else :data:`UNMATCHED_ROUTE`."""
    route: Any = scope.get("route")
    if route is None:
        route = _match(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def _match(routes: Any, scope: Scope) -> Any:
    """The first route (looking inside included routers) that matches the request, or None."""
    for candidate in routes:
        inner = getattr(candidate, "original_router", None)  # FastAPI's included router
        if inner is not None:
            found = _match(getattr(inner, "routes", ()), scope)
        else:
            found = candidate if candidate.matches(dict(scope))[0] is not Match.NONE else None
        if found is not None:
            return found
    return None


class MetricsMiddleware:
    """Pure ASGI middleware: binds the app's metrics and records every HTTP request.

    The route label is the matched route's template (``/v1/jobs/{job_id}``, never the raw path),
    the version label the response's ``X-Model-Version`` header (empty when there is none).
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _current.set(self.metrics)
        try:
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            elif scope["type"] == "http":
                await self._http(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            _current.reset(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        with _running_lock:
            _running.append(self.metrics)
        try:
            await self.app(scope, receive, send)
        finally:
            with _running_lock:
                _running.remove(self.metrics)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "version": None}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = int(message["status"])
                answer["version"] = answered_version(message)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.record_request(
                _route_template(scope), scope.get("method", "GET"), answer["status"],
                answer["version"], time.perf_counter() - start,
            )
