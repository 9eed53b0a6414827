"""Admission control: a bounded number of requests in the service at once.

Requests beyond ``max_queued_requests`` (waiting for a worker or in inference, with their bodies in
memory) are answered at once with 503 ``busy`` and ``Retry-After``, before their body is read: under
overload the queue, and the memory its bodies hold, stay bounded, and clients learn when to come
back instead of timing out. The health probes are always admitted: an orchestrator that cannot get
an answer from a busy service would restart it, which helps nobody.

Slow clients are bounded elsewhere: a request's headers must arrive within ``header_timeout_seconds``
(aiohttp's keep-alive timer, armed when the connection opens and not reset by incoming bytes, closes
a connection whose first request never completes), its body within ``body_timeout_seconds`` (408).
"""

from __future__ import annotations

import structlog
from aiohttp import web

from supervisor.http.middleware import Handler, json_error

__all__ = ["PROBES", "Admission"]

log = structlog.get_logger("edgeloader.api")

PROBES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
RETRY_AFTER_S = 1


class Admission:
    """The middleware and its counters (requests admitted now, refused so far)."""

    def __init__(self, limit: int, retry_after: int = RETRY_AFTER_S) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self.peak = 0
        self.refused = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PROBES:
            return await handler(request)
        if self.in_flight >= self.limit:
            self.refused += 1
            if self.refused % 1000 == 1:
                log.warning("overloaded", limit=self.limit, refused=self.refused)
            response = json_error(503, "busy", f"the service is busy ({self.limit} requests in progress); "
                                  f"retry after {self.retry_after} s")
            response.headers["Retry-After"] = str(self.retry_after)
            return response
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
