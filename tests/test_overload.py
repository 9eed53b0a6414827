"""Overload (issue 16): a real `edgeloader serve` on loopback, a few hundred concurrent connections.
Beyond `max_queued_requests` the answer is 503 busy with Retry-After (no other 5xx), the server's
memory stays bounded, and it answers right after; clients that trickle their headers or their body
are cut off after `header_timeout_seconds` / `body_timeout_seconds`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from packages import ROOT
from test_crash import free_port

CLIENTS = 300
REQUESTS_EACH = 4
QUEUE = 8


class Server:
    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        environ = {**os.environ, "EDGELOADER_WORKERS": "1", "EDGELOADER_RUNTIME_THREADS": "1",
                   "EDGELOADER_LOG_FORMAT": "json", "EDGELOADER_LOG_LEVEL": "warning", **env}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                 "--port", str(self.port), "--twin", "off"], cwd=ROOT, env=environ, stdout=out,
                stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", tmp_path / "service.log", EDGELOADER_MAX_QUEUED_REQUESTS=str(QUEUE),
                 EDGELOADER_HEADER_TIMEOUT_SECONDS="2", EDGELOADER_BODY_TIMEOUT_SECONDS="2")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert srv.proc.poll() is None, srv.log.read_text()[-2000:]
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=1) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        yield srv
    finally:
        srv.stop()


async def test_hundreds_of_concurrent_clients_get_answers_or_503_and_memory_stays_bounded(
    server: Server, photo: bytes,
) -> None:
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    errors: list[str] = []
    missing_retry_after = 0
    baseline = server.rss_kb()
    peak = baseline
    done = asyncio.Event()

    async def watch_memory() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(server.rss_kb))
            await asyncio.sleep(0.02)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal missing_retry_after
        for _ in range(REQUESTS_EACH):
            try:
                async with session.post(f"{server.url}/detect", data=photo,
                                        headers={"Content-Type": "image/jpeg"}) as resp:
                    body = await resp.json()
                    statuses[resp.status] += 1
                    if resp.status == 503:
                        codes[body["error"]["code"]] += 1
                        missing_retry_after += "Retry-After" not in resp.headers
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(type(exc).__name__)

    watcher = asyncio.create_task(watch_memory())
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started
        # Right after: the service answers at once.
        after = time.perf_counter()
        async with session.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        async with session.post(f"{server.url}/detect", data=photo, headers={"Content-Type": "image/jpeg"}) as resp:
            assert resp.status == 200, await resp.text()
        answered_after = time.perf_counter() - after
    done.set()
    await watcher
    total = CLIENTS * REQUESTS_EACH
    print(f"\noverload: {CLIENTS} concurrent clients x {REQUESTS_EACH}: {statuses[200]} served, {statuses[503]} "
          f"refused (503 busy), other {dict((k, v) for k, v in statuses.items() if k not in (200, 503))}, "
          f"client errors {len(errors)}, {elapsed:.1f} s; server RSS {baseline / 1024:.0f} MB before, peak "
          f"{peak / 1024:.0f} MB (+{(peak - baseline) / 1024:.0f} MB); answered {answered_after * 1000:.0f} ms after")
    assert not errors, Counter(errors)
    assert set(statuses) <= {200, 503}, statuses
    assert sum(statuses.values()) == total
    assert statuses[200] > 0 and statuses[503] > 0
    assert set(codes) == {"busy"} and missing_retry_after == 0
    assert peak - baseline < 150 * 1024, "memory must not grow with the queue"
    assert answered_after < 2.0


async def test_trickled_headers_and_bodies_are_cut_off(server: Server, photo: bytes) -> None:
    loop = asyncio.get_running_loop()

    async def trickle_headers() -> float:
        """Headers one byte every 0.2 s, never complete: returns how long until the server closed."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        start = loop.time()
        writer.write(b"POST /detect HTTP/1.1\r\nHost: x\r\n")
        try:
            for byte in b"X-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if not await asyncio.wait_for(reader.read(1024), 0.2):
                        break  # closed by the server
                except TimeoutError:
                    continue
        except (ConnectionError, OSError):
            pass
        writer.close()
        return loop.time() - start

    async def trickle_body() -> tuple[int, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        start = loop.time()
        writer.write(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     + f"Content-Length: {len(photo)}\r\n\r\n".encode())
        status = 0
        for i in range(0, 400):
            writer.write(photo[i * 10:(i + 1) * 10])
            try:
                line = await asyncio.wait_for(reader.readline(), 0.1)
            except TimeoutError:
                continue
            if line.startswith(b"HTTP/1.1"):
                status = int(line.split()[1])
                break
        writer.close()
        return status, loop.time() - start

    slow = await asyncio.gather(*(trickle_headers() for _ in range(50)), trickle_body())
    header_times, (body_status, body_time) = slow[:-1], slow[-1]
    print(f"\nslow clients: 50 trickled headers cut after {min(header_times):.1f}-{max(header_times):.1f} s, "
          f"a trickled body answered {body_status} after {body_time:.1f} s")
    assert all(t < 6.0 for t in header_times), header_times  # header_timeout_seconds=2
    assert body_status == 408 and body_time < 6.0
    async with aiohttp.ClientSession() as session, session.post(
        f"{server.url}/detect", data=photo, headers={"Content-Type": "image/jpeg"}
    ) as resp:
        assert resp.status == 200
