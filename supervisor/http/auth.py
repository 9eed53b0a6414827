"""Optional bearer-token check for the HTTP API.

Without a token the API is open, as it is for most modules that only other modules on the same
IoT Edge network reach. With ``api_token`` set, requests need ``Authorization: Bearer <token>``:
with scope ``admin`` only the routes that change which model serves (POST under /models), with
scope ``all`` every route except the health probes (the container HEALTHCHECK and the IoT Edge
agent cannot send a token).
"""

from __future__ import annotations

import hmac

import structlog
from aiohttp import web

from supervisor.http.middleware import Handler, json_error
from supervisor.settings import API_TOKEN_SCOPES

__all__ = ["has_token", "token_middleware"]

log = structlog.get_logger("edgeloader.auth")

_HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# The status page: a browser's address bar sends no token, so the page itself always loads; with
# scope "all" it shows nothing until its script sends the token (http/status_page.py checks it).
_PAGE_PATHS = frozenset({"/"})


def has_token(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>``."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _protected(request: web.Request, scope: str) -> bool:
    if scope == "all":
        return request.path not in _HEALTH_PATHS and not (request.method == "GET" and request.path in _PAGE_PATHS)
    return request.method == "POST" and request.path.startswith("/models/")


def token_middleware(token: str, scope: str) -> web.middleware:  # type: ignore[valid-type]
    """A middleware that refuses protected requests without the token (401, JSON, WWW-Authenticate)."""
    if scope not in API_TOKEN_SCOPES:
        raise ValueError(f"api_token_scope must be one of {', '.join(API_TOKEN_SCOPES)}, not {scope!r}")

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _protected(request, scope) and not has_token(request, token):
            log.warning("unauthorized", method=request.method, path=request.path,
                        remote=request.remote, had_token="Authorization" in request.headers)
            response = json_error(401, "unauthorized", "this route needs 'Authorization: Bearer <api token>'")
            response.headers["WWW-Authenticate"] = 'Bearer realm="edgeloader"'
            return response
        return await handler(request)

    return check_token
