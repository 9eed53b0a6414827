"""Model downloads go through the site's proxy: ``HTTPS_PROXY`` / ``HTTP_PROXY`` are honoured and ``NO_PROXY``
bypasses them, as a module process reads them from its environment (docs/twin.md, "Proxies").

The download runs in a child process started with that environment, exactly as the module starts; the
origin is an aiohttp server on loopback (HTTPS with a certificate from a throw-away CA, which the child trusts
through ``SSL_CERT_FILE``, or plain HTTP), and the proxy a small real one on loopback that tunnels CONNECT
and forwards absolute-form requests, counting both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from aiohttp import web

if TYPE_CHECKING:
    from iot_fixtures import TestCA

pytest_plugins = ["iot_fixtures"]

REPO = Path(__file__).resolve().parent.parent
PACKAGE = hashlib.sha256(b"model").digest() * 40_000  # 1.28 MB
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")

_CHILD = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from supervisor.twin.download import Download

async def main():
    result = await Download(sys.argv[2], Path(sys.argv[3]), sha256=sys.argv[4], retries=1, backoff_base=0.05,
                            backoff_max=0.1, connect_timeout=5, read_timeout=10).run()
    print(result.size, result.sha256)

asyncio.run(main())
"""


@dataclass
class Proxy:
    """An HTTP proxy: CONNECT tunnels (what HTTPS goes through) and forwarded plain-HTTP requests."""

    port: int = 0
    connects: list[str] = field(default_factory=list)  # host:port of each tunnel
    forwarded: list[str] = field(default_factory=list)  # absolute URL of each forwarded request

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                self.connects.append(target)
                up_reader, upstream = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                url = urlsplit(target)
                assert url.scheme == "http" and url.hostname, f"not a proxy request: {request_line}"
                self.forwarded.append(target)
                up_reader, upstream = await asyncio.open_connection(url.hostname, url.port or 80)
                path = url.path + (f"?{url.query}" if url.query else "")
                headers = [h for h in header_lines if h and not h.lower().startswith(("proxy-", "connection:"))]
                upstream.write("\r\n".join([f"{method} {path} {version}", *headers, "Connection: close", "", ""])
                               .encode("latin-1"))
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    p.port = server.sockets[0].getsockname()[1]
    async with server:
        yield p


@dataclass
class Origin:
    url: str
    requests: list[str]


async def _origin(tmp_path: Path, ca: TestCA | None) -> AsyncIterator[Origin]:
    requests: list[str] = []

    async def package(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.Response(body=PACKAGE, content_type="application/zip", headers={"ETag": '"0x8D1"'})

    app = web.Application()
    app.router.add_get("/models/faces-2.zip", package)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = None
    if ca is not None:
        cert, key = ca.issue("127.0.0.1")
        (tmp_path / "origin.pem").write_bytes(cert)
        (tmp_path / "origin.key").write_bytes(key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "origin.pem", tmp_path / "origin.key")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Origin(f"{'https' if ca else 'http'}://127.0.0.1:{port}/models/faces-2.zip?sv=1&sig=S", requests)
    finally:
        await runner.cleanup()


@pytest.fixture
async def https_origin(tmp_path: Path, test_ca: TestCA) -> AsyncIterator[Origin]:
    async for origin in _origin(tmp_path, test_ca):
        yield origin


@pytest.fixture
async def http_origin(tmp_path: Path) -> AsyncIterator[Origin]:
    async for origin in _origin(tmp_path, None):
        yield origin


async def download_in_child(url: str, tmp_path: Path, env: dict[str, str], trust: TestCA | None = None) -> str:
    """Run a Download in a new process with ``env`` added to a proxy-free environment; its stdout."""
    base = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    if trust is not None:
        (tmp_path / "ca.pem").write_bytes(trust.pem)
        base["SSL_CERT_FILE"] = str(tmp_path / "ca.pem")
    part = tmp_path / "faces-2.zip.part"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(REPO), url, str(part), hashlib.sha256(PACKAGE).hexdigest(),
        env={**base, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 0, err.decode()[-3000:]
    assert part.read_bytes() == PACKAGE
    return out.decode()


async def test_https_download_tunnels_through_https_proxy(
    tmp_path: Path, proxy: Proxy, https_origin: Origin, test_ca: TestCA
) -> None:
    origin_host = urlsplit(https_origin.url).netloc
    await download_in_child(https_origin.url, tmp_path, {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"}, test_ca)
    assert proxy.connects == [origin_host], "the download went around the proxy"
    assert https_origin.requests == ["/models/faces-2.zip"]


async def test_lower_case_https_proxy_works_too(
    tmp_path: Path, proxy: Proxy, https_origin: Origin, test_ca: TestCA
) -> None:
    await download_in_child(https_origin.url, tmp_path, {"https_proxy": f"http://127.0.0.1:{proxy.port}"}, test_ca)
    assert len(proxy.connects) == 1


async def test_no_proxy_bypasses_the_proxy(
    tmp_path: Path, proxy: Proxy, https_origin: Origin, test_ca: TestCA
) -> None:
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": "localhost,127.0.0.1"}
    await download_in_child(https_origin.url, tmp_path, env, test_ca)
    assert proxy.connects == [] and proxy.forwarded == []
    assert https_origin.requests == ["/models/faces-2.zip"]


async def test_plain_http_download_is_forwarded_by_http_proxy(
    tmp_path: Path, proxy: Proxy, http_origin: Origin
) -> None:
    await download_in_child(http_origin.url, tmp_path, {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}"})
    assert proxy.forwarded == [http_origin.url] and proxy.connects == []
    assert http_origin.requests == ["/models/faces-2.zip"]


async def test_a_dead_proxy_fails_the_download_rather_than_going_around_it(
    tmp_path: Path, https_origin: Origin, test_ca: TestCA
) -> None:
    """A site that must go through its proxy does not see devices fetch directly when the proxy is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(AssertionError, match="gave up"):
            await download_in_child(https_origin.url, tmp_path, {"HTTPS_PROXY": f"http://127.0.0.1:{dead}"}, test_ca)
    assert https_origin.requests == []
