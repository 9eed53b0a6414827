"""The request middlewares: every error as JSON in one place, and one log line per request.

Typed errors (supervisor/errors.py) carry their status; aiohttp's own HTTP errors keep theirs; a
client that hangs up is logged as such; anything else is a logged 500 with no detail leaked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import ClientConnectionResetError, ClientPayloadError, web

from supervisor.errors import EdgeLoaderError
from supervisor.package.paths import public_reason

__all__ = ["Handler", "error_middleware", "json_error", "request_log_middleware"]

log = structlog.get_logger("edgeloader.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, code: str, message: str) -> web.Response:
    # Messages may carry a library's words: printable text, no object reprs, bounded length.
    message = public_reason(message, 400, strip_paths=False)
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# The client went away mid-request: nothing to answer, nothing of ours broke.
_CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError, ClientPayloadError)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Typed errors and aiohttp's own HTTP errors become JSON; anything else is a logged 500."""
    try:
        return await handler(request)
    except _CLIENT_GONE as exc:
        log.info("client_disconnected", path=request.path, error=type(exc).__name__)
        return json_error(400, "client_disconnected", "the client closed the connection before the body was sent")
    except EdgeLoaderError as exc:
        response = json_error(exc.status, exc.code, str(exc))
        if exc.code == "busy":  # out of a shared resource for now: say when to come back
            response.headers["Retry-After"] = "1"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return json_error(exc.status, code, message or exc.reason)
    except Exception:
        log.exception("unhandled_error", path=request.path)
        return json_error(500, "internal_error", "internal error; see the service log")


@web.middleware
async def request_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request, with a request id (X-Request-ID or a new one) and timing."""
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:16]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        if request.path not in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            log.info("request", method=request.method, path=request.path, status=status,
                     ms=round((time.perf_counter() - start) * 1000, 2))
        structlog.contextvars.unbind_contextvars("request_id", "model", "model_version")


