"""Feeding the metrics and the pending-work view, and ``GET /metrics``.

Most series come from two places, not from calls sprinkled through the flows:

- the request middleware (``metrics_middleware``): every request's route, status, duration, the
  stages of a detection (noted by the route that ran the engine) and the requests in flight;
- the event bus (``observe_ctx``, a subscriber for the life of the app): swaps, rollbacks, rejected
  packages by the kind of their reason, and downloads in progress (``updates/pending.py``).

The twin's connection state and the active model are read when scraped (``_StateCollector``). Model
loads come from the engine's ``on_load`` hook and download bytes from the download's ``counters``
hook (app.py wires both).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.http.keys import DOWNLOADS, ENGINE, EVENTS, METRICS, TWIN_STATUS
from supervisor.http.middleware import Handler
from supervisor.metrics import stage_timings_scope
from supervisor.twin.status import TwinState
from supervisor.updates.events import ModelEvent

__all__ = ["install_metrics", "metrics_middleware", "observe_ctx", "reason_kind", "routes"]

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

_TWIN_STATES: tuple[TwinState, ...] = ("starting", "connecting", "connected", "disconnected", "standalone", "off")

# The kind of a quarantine reason (a bounded label set), from the words the checks use
# (package/, updates/late_sidecar.py, serving/loader.py). First match wins; anything else is "other".
_REASON_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("checksum", re.compile(r"checksum|sha-?256|\bmd5\b", re.I)),
    ("unsafe_path", re.compile(r"unsafe path|symlink|hard link|special file|leaves the package", re.I)),
    ("too_large", re.compile(r"zip bomb|the limit is|\blimit\b|too (big|large|deep)", re.I)),
    ("archive", re.compile(r"zip|archive|truncated|the package file is empty", re.I)),
    ("manifest", re.compile(r"model\.json|manifest|unknown key|must be", re.I)),
    ("labels", re.compile(r"label", re.I)),
    ("model", re.compile(r"load|handler|onnx|tflite|model|runtime|inference", re.I)),
)


def reason_kind(reason: str | None) -> str:
    """``"checksum mismatch for labels.txt: ..."`` -> ``"checksum"``: the label of a rejection."""
    for kind, pattern in _REASON_KINDS:
        if reason and pattern.search(reason):
            return kind
    return "other"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: it sees the status the client gets (errors already turned into JSON)."""
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.in_flight.inc()
    start = time.perf_counter()
    status = 500
    with stage_timings_scope() as stages:
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # a redirect or anything else the inner middlewares pass on
            status = exc.status
            raise
        finally:
            metrics.in_flight.dec()
            metrics.request_done(request.method, route, status, time.perf_counter() - start, stages)


class _StateCollector(Collector):
    """Read at scrape time: the twin's state and the active model."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check for name clashes at registration: collect() reads the app

    def collect(self) -> Iterable[Metric]:
        status = self._app.get(TWIN_STATUS)
        state = status.state if status is not None else None
        yield GaugeMetricFamily("edgeloader_twin_connected", "1 while connected to IoT Hub, else 0",
                                value=1.0 if state == "connected" else 0.0)
        states = GaugeMetricFamily("edgeloader_twin_state", "The twin service's state: 1 for the current one",
                                   labels=["state"])
        for name in _TWIN_STATES:
            states.add_metric([name], 1.0 if state == name else 0.0)
        yield states
        engine = self._app.get(ENGINE)
        model = engine.active if engine is not None else None
        info = InfoMetricFamily("edgeloader_active_model", "The model serving now (absent while none is)")
        if model is not None:
            i = model.info
            info.add_metric([], {"name": i.name, "version": i.version, "handler": i.handler,
                                 "sha256": i.model_sha256, "labels": str(len(i.labels))})
        yield info


def install_metrics(app: web.Application) -> None:
    """Register the scrape-time series on the app's registry (the app's Metrics exists already)."""
    app[METRICS].registry.register(_StateCollector(app))


def _observe(app: web.Application, event: ModelEvent) -> None:
    metrics = app[METRICS]
    if event.state == "active":
        metrics.swaps.labels(event.source).inc()
    elif event.state == "rolled_back":
        metrics.rollbacks.labels(event.source).inc()
    elif event.state == "rejected":
        metrics.quarantined.labels(reason_kind(event.reason)).inc()
    app[DOWNLOADS].on_event(event)


async def observe_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow the event bus for the app's life. Entered before the engine: the start-up swap counts."""

    async def follow() -> None:
        async for event in app[EVENTS].subscribe():
            try:
                _observe(app, event)
            except Exception:  # a metric must never take the service's events down with it
                log.exception("observe_event_failed", state=event.state)

    task = asyncio.create_task(follow(), name="observe-events")
    await asyncio.sleep(0)  # subscribed before anything publishes
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
