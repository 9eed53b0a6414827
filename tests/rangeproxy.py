"""A counting HTTP proxy in front of Azurite: every request it forwards is recorded (method, Range,
If-Match, status, body bytes), so a test can say how many Range requests an update made and how many
bytes crossed the "link". It can also pace the body (bytes per second) to let a test stop a download
half-way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiohttp import web


@dataclass
class Seen:
    method: str
    range: str | None
    if_match: str | None
    status: int = 0
    body_bytes: int = 0


class RangeProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.requests: list[Seen] = []
        self.rate: float | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address = ""

    async def start(self) -> RangeProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.address = f"127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, url: str) -> str:
        """``url`` (a SAS URL of Azurite) through this proxy."""
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, self.address, parts.path, parts.query, ""))

    @property
    def body_bytes(self) -> int:
        return sum(s.body_bytes for s in self.requests)

    @property
    def ranged(self) -> list[Seen]:
        return [s for s in self.requests if s.range]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        seen = Seen(request.method, request.headers.get("Range"), request.headers.get("If-Match"))
        self.requests.append(seen)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")}
        async with self._session.request(request.method, self.target + request.path_qs, headers=headers) as up:
            seen.status = up.status
            response = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")})
            await response.prepare(request)
            async for data in up.content.iter_chunked(16 * 1024):
                await response.write(data)
                seen.body_bytes += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
            await response.write_eof()
            return response


@pytest.fixture
async def range_proxy(azurite) -> AsyncIterator[RangeProxy]:  # type: ignore[no-untyped-def]
    proxy = await RangeProxy(f"http://{azurite.host}:{azurite.port}").start()
    try:
        yield proxy
    finally:
        await proxy.stop()
