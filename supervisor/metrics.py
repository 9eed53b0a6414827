"""The service's Prometheus metrics, on a registry of its own (one per app, never the process-wide
default: tests build several apps in one process, and a module that imports prometheus_client must not
find our series in its own ``/metrics``).

A leaf: it imports nothing of the service. The request middleware, the event-bus observer
(``http/observe.py``), the engine's load hook and the download code feed it; each through a method
here, so that a flow only ever calls a small typed method, never a prometheus object.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

__all__ = ["STAGES", "Metrics", "note_stage_timings", "stage_timings_scope"]

# The stages of one detection, as the engine times them (``timing_ms``).
STAGES = ("decode", "preprocess", "inference", "postprocess")

# Request durations on an edge box: a BlazeFace /detect is ~2 ms, a tiny-YOLOv3 one ~30 ms, a 12 MP JPEG
# on a 416x416 model ~60 ms; a /models read or a slow client can take seconds.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# A model load with warm-up: BlazeFace 0.05 s, an SSD 0.3 s, a first ONNX load that writes the
# optimised cache several seconds on a small ARM board.
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Set by the request middleware for the length of one request; filled by the route that ran the
# engine (``note_stage_timings``). A mutable holder: the route's writes reach the middleware even if
# something between them runs in a copied context.
_stage_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "edgeloader_stage_timings", default=None
)


@contextmanager
def stage_timings_scope() -> Iterator[dict[str, float]]:
    """A fresh holder for the stage timings of the request being answered."""
    holder: dict[str, float] = {}
    token = _stage_timings.set(holder)
    try:
        yield holder
    finally:
        _stage_timings.reset(token)


def note_stage_timings(timing_ms: Mapping[str, float]) -> None:
    """What a detection's stages took (the engine's ``timing_ms``), for the request's metrics."""
    holder = _stage_timings.get()
    if holder is not None:
        holder.update(timing_ms)


class Metrics:
    """Every series the service exports, on ``registry``. Names follow Prometheus' conventions:
    ``edgeloader_`` prefix, base units (seconds, bytes), ``_total`` on counters (added by the client)."""

    def __init__(self) -> None:
        # No ``*_created`` series beside each counter and histogram: they double what a device sends for
        # nothing Prometheus needs (it tells resets apart by value). A process-wide switch of the client
        # library; the service is the only user of it in its process.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgeloader_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("edgeloader_http_request_duration_seconds",
                                         "Time from a request's arrival to its answer, by route",
                                         ["method", "route"], buckets=_REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge("edgeloader_http_requests_in_flight", "HTTP requests being answered now", registry=r)
        self.stage_seconds = Histogram("edgeloader_detect_stage_duration_seconds",
                                       "Time a detection spent in each stage: decode, preprocess, inference, "
                                       "postprocess", ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.model_loads = Counter("edgeloader_model_loads", "Model loads (with warm-up), by result",
                                   ["result"], registry=r)
        self.model_load_seconds = Histogram("edgeloader_model_load_duration_seconds",
                                            "Time to load and warm up a model", buckets=_LOAD_BUCKETS, registry=r)
        self.swaps = Counter("edgeloader_model_swaps", "Models made active, by what asked (inbox, staging, twin, "
                             "api, cli, startup, auto-rollback)", ["source"], registry=r)
        self.rollbacks = Counter("edgeloader_model_rollbacks", "Rollbacks to an older version, by who asked",
                                 ["source"], registry=r)
        self.quarantined = Counter("edgeloader_packages_quarantined", "Packages rejected into quarantine, by the "
                                   "kind of reason", ["reason"], registry=r)
        self.download_bytes = Counter("edgeloader_download_bytes", "Package bytes downloaded (fetched) or kept "
                                      "from an interrupted download (reused)", ["kind"], registry=r)
        self.download_resumes = Counter("edgeloader_download_resumes", "Downloads that continued an interrupted "
                                        "one instead of starting over", registry=r)
        # Series that exist from the start, at 0: a rate() over them works from the first scrape.
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for result in ("ok", "failed"):
            self.model_loads.labels(result)
        for kind in ("fetched", "reused"):
            self.download_bytes.labels(kind)

    # -- requests (http/observe.py) -----------------------------------------------------------------

    def request_done(self, method: str, route: str, status: int, seconds: float, stages: Mapping[str, float]) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)
        for stage, ms in stages.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    # -- models (the engine's load hook, the event bus) -------------------------------------------

    def model_loaded(self, seconds: float, ok: bool) -> None:
        self.model_loads.labels("ok" if ok else "failed").inc()
        if ok:
            self.model_load_seconds.observe(seconds)

    # -- downloads (twin/download.py, through its ``counters`` hook) ---------------------------------

    def fetched(self, n: int) -> None:
        self.download_bytes.labels("fetched").inc(n)

    def reused(self, n: int) -> None:
        self.download_bytes.labels("reused").inc(n)

    def resumed(self) -> None:
        self.download_resumes.inc()
