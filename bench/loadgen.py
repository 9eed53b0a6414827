"""A small closed-loop HTTP/1.1 load generator on asyncio streams, with per-request timestamps.

wrk measures throughput; this one is for the swap test, which needs to know *when* each request
ran (to split latencies into "during a swap" and "steady"). It keeps one keep-alive connection per
client, sends pre-built request bytes and parses only the status line and Content-Length, so it
costs a few percent of a core at the rates involved (measured and reported as ``client_cpu_pct``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

__all__ = ["Load", "Sample"]


@dataclass(frozen=True)
class Sample:
    start: float
    end: float
    status: int  # 0: connection error


@dataclass
class Load:
    """``clients`` connections posting ``body`` to ``path`` until ``stop()``."""

    host: str
    port: int
    body: bytes
    clients: int
    path: str = "/detect"
    samples: list[Sample] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _cpu0: float = 0.0
    _t0: float = 0.0
    cpu_pct: float = float("nan")

    def start(self) -> None:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        self._cpu0, self._t0 = time.process_time(), time.perf_counter()
        self._tasks = [asyncio.create_task(self._client(head), name=f"loadgen-{i}") for i in range(self.clients)]

    async def stop(self) -> list[Sample]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self.cpu_pct = round(100 * (time.process_time() - self._cpu0) / (time.perf_counter() - self._t0), 1)
        return self.samples

    async def _client(self, head: bytes) -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while not self._stop.is_set():
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    now = time.perf_counter()
                    self.samples.append(Sample(now, now, 0))
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            t = time.perf_counter()
            try:
                writer.write(head)
                writer.write(self.body)
                status, close = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.samples.append(Sample(t, time.perf_counter(), 0))
                writer.close()
                writer = None
                continue
            self.samples.append(Sample(t, time.perf_counter(), status))
            if close:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    header = await reader.readuntil(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close
