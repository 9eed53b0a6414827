"""Resumable, verified HTTP download of a model package into staging.

The body is streamed to ``<staging>/<FileName>.part`` (the same filesystem as the repository, so the
final ``os.replace`` is atomic) and hashed on the way; it never sits in memory whole. After a cut the
download resumes with ``Range`` and ``If-Match``/``If-Range`` on the ETag; a blob that changed meanwhile
(412, or 200 instead of 206) starts over. Retries are bounded, with capped exponential backoff and
jitter; an expired SAS (403) or a missing blob (404) fails at once with a reason, never in a loop.

A download that is cancelled (the service stops) keeps its ``.part`` and a small ``.<FileName>.resume``
note (the blob's ETag); the next download of the same blob re-hashes what is there and fetches only
the rest. Both names are ignored by the staging watcher.

``partfile.commit`` then hands the verified file to the update pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from supervisor.formats import parse_md5, parse_sha256
from supervisor.redact import redact, redact_url
from supervisor.twin.gate import Gate, WindowClosed
from supervisor.twin.partfile import PartFile, resume_note_path

__all__ = [
    "Download",
    "DownloadCounters",
    "DownloadError",
    "DownloadResult",
    "parse_md5",
    "parse_sha256",
]

log = structlog.get_logger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
# A 416's Content-Range: the blob's size (RFC 9110 14.4).
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)
# Statuses worth another try; anything else that is not 200/206/412/416 is final.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Room kept free beyond the package itself: the pipeline still has to unpack it.
_FREE_SPACE_MARGIN = 16 * 1024 * 1024
# Chunks between the network reader and the disk writer (at most this many x chunk_size in memory).
_QUEUE_CHUNKS = 32


class DownloadCounters(Protocol):
    """Where a download counts its bytes (the service's metrics, ``supervisor/metrics.py``)."""

    def fetched(self, n: int) -> None: ...  # body bytes received over the network
    def reused(self, n: int) -> None: ...  # bytes kept from an interrupted run instead of fetched again
    def resumed(self) -> None: ...  # a run that continued an interrupted one


class DownloadError(Exception):
    """A download that did not produce a verified file. ``reason`` is short and safe to report."""

    def __init__(self, reason: str, *, permanent: bool = True, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = redact(reason)
        self.permanent = permanent
        self.status = status


@dataclass(frozen=True)
class DownloadResult:
    path: Path  # the verified ``.part`` file, ready for ``commit``
    size: int
    sha256: str  # hex
    md5: str  # base64, as Azure Blob Storage writes Content-MD5
    bytes_fetched: int  # body bytes received over the network, retries included
    attempts: int  # HTTP requests made
    etag: str | None


class Download:
    """One download of ``url`` into ``part_path``. Read ``bytes_fetched``/``bytes_done``/``total`` live."""

    def __init__(
        self,
        url: str,
        part_path: Path,
        *,
        expected_length: int | None = None,
        sha256: str | None = None,
        md5: bytes | None = None,
        session: aiohttp.ClientSession | None = None,
        chunk_size: int = 256 * 1024,
        retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 15.0,
        read_timeout: float = 30.0,
        progress: Callable[[int, int | None], None] | None = None,
        counters: DownloadCounters | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.url = url
        self.part_path = part_path
        self.expected_length = expected_length
        self.expected_sha256 = sha256
        self.expected_md5 = md5
        self._session = session
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._progress = progress
        self._counters = counters
        self._gate = gate or Gate()
        self.bytes_fetched = 0
        self.bytes_done = 0
        self.total: int | None = expected_length
        self.attempts = 0
        self.etag: str | None = None
        self.resumed_bytes = 0  # bytes kept from an earlier, interrupted run
        self.bytes_reused = 0  # a whole download reuses nothing of the stored versions
        self._sink = PartFile(part_path)
        self.resume_path = resume_note_path(part_path)
        # What identifies the blob across runs: the URL without its query (a new SAS for the same blob
        # may resume) and what the twin expects of it.
        self._identity = {
            "blob": redact_url(url).split("?", 1)[0], "sha256": sha256, "length": expected_length,
        }
        self._log = log.bind(url=redact_url(url), file=part_path.name)

    async def run(self) -> DownloadResult:
        """Download, verify and return the result. On failure the ``.part`` file is removed; on
        cancellation it is kept (with its resume note) when a later run can continue it."""
        own_session = self._session is None
        session = self._session or aiohttp.ClientSession(trust_env=True)  # HTTPS_PROXY, NO_PROXY (docs/twin.md)
        try:
            self.resumed_bytes = await asyncio.to_thread(self._open)
            self.bytes_done = self.resumed_bytes
            if self._counters is not None and self.resumed_bytes:
                self._counters.reused(self.resumed_bytes)
                self._counters.resumed()
            if self.expected_length is not None:
                self._check_free_space(self.expected_length - self.resumed_bytes)
            await self._fetch(session)
            await asyncio.to_thread(self._sink.finish)
            try:
                result = self._verify()
            except DownloadError:
                if not self.resumed_bytes:
                    raise
                # The kept part was bad (a power cut can leave junk at its end): once more, afresh.
                self._log.warning("resumed_download_corrupt", resumed=self.resumed_bytes)
                self.resumed_bytes = 0
                await self._restart()
                await self._fetch(session)
                await asyncio.to_thread(self._sink.finish)
                result = self._verify()
        except asyncio.CancelledError:
            keep = bool(self.etag and self.bytes_done)
            await asyncio.shield(asyncio.to_thread(self._sink.close if keep else self._discard))
            raise
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._discard))
            raise
        finally:
            if own_session:
                await session.close()
        await asyncio.to_thread(self.resume_path.unlink, missing_ok=True)
        self._log.info(
            "download_verified", size=result.size, sha256=result.sha256, bytes_fetched=result.bytes_fetched,
            attempts=result.attempts, resumed_from=self.resumed_bytes or None,
        )
        return result

    @property
    def bytes_needed(self) -> int | None:
        """Bytes this download has to bring over the link (what an interrupted run kept is not)."""
        return None if self.total is None else self.total - self.resumed_bytes

    def _discard(self) -> None:
        self._sink.discard()
        self.resume_path.unlink(missing_ok=True)

    def _open(self) -> int:
        """Start the ``.part`` file, or continue the one an interrupted run left. Blocking."""
        try:
            note = json.loads(self.resume_path.read_text("utf-8"))
            usable = (
                isinstance(note, dict) and note.get("identity") == self._identity
                and isinstance(note.get("etag"), str) and not note["etag"].startswith("W/")
                and self.part_path.is_file()
            )
        except (OSError, ValueError):
            usable = False
        if usable:
            size = self._sink.reopen()
            total = note.get("total")
            if size and (not isinstance(total, int) or size <= total):
                self.etag, self.total = note["etag"], total
                self._log.info("download_resuming", kept=size, total=total)
                return size
        self.resume_path.unlink(missing_ok=True)
        self._sink.reset()
        return 0

    def _write_note(self) -> None:
        note = {"identity": self._identity, "etag": self.etag, "total": self.total}
        tmp = self.resume_path.with_name(self.resume_path.name + ".part")
        tmp.write_text(json.dumps(note), "utf-8")
        os.replace(tmp, self.resume_path)

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        # Consecutive attempts that brought no byte beyond the furthest point reached: bytes fetched
        # again after a restart are no progress, or a server that answers every resume with a restart
        # (a 416 to a blob shorter than the desired length, ETags that flap between replicas) would
        # have the whole blob fetched over and over, for ever.
        failures = 0
        furthest = self.bytes_done
        while self.total is None or self.bytes_done < self.total:
            await self._gate.wait_open()
            try:
                await self._attempt(session)
                if self.total is not None and self.bytes_done < self.total:
                    raise DownloadError("connection closed before the end of the body", permanent=False)
            except WindowClosed:
                self._log.info("download_paused", done=self.bytes_done, total=self.total)
                continue  # not a failure: wait for the next window, then resume
            except DownloadError as exc:
                if exc.permanent:
                    raise
                reason = exc.reason
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                continue
            failures = 0 if self.bytes_done > furthest else failures + 1
            furthest = max(furthest, self.bytes_done)
            if failures > self.retries:
                raise DownloadError(f"gave up after {self.attempts} attempts: {reason}", permanent=False)
            delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, failures - 1))
            delay *= random.uniform(0.5, 1.0)
            self._log.warning(
                "download_retry", reason=reason, done=self.bytes_done, total=self.total, delay=round(delay, 2)
            )
            await asyncio.sleep(delay)

    async def _restart(self) -> None:
        self.bytes_done = 0
        self.etag = None
        self.total = self.expected_length
        await asyncio.to_thread(self._sink.reset)

    async def _attempt(self, session: aiohttp.ClientSession) -> None:
        headers = {"Accept-Encoding": "identity"}
        offset = self.bytes_done
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.etag and not self.etag.startswith("W/"):
                # If-Match: Azure Blob answers 412 when the blob changed. If-Range: a plain HTTP server
                # answers 200 with the whole new body instead. Either way we start over.
                headers["If-Match"] = self.etag
                headers["If-Range"] = self.etag
        self.attempts += 1
        async with session.get(
            self.url, headers=headers, timeout=self._timeout, auto_decompress=False
        ) as resp:
            status = resp.status
            if status in (412, 416):
                if status == 416 and self.total is not None and offset >= self.total:
                    return
                size = _unsatisfiable_size(resp.headers.get("Content-Range", ""))
                if status == 416 and size is not None and self.expected_length not in (None, size):
                    # The blob is shorter than the desired ContentLength: starting over cannot help.
                    raise DownloadError(
                        f"length mismatch: server has {size} bytes, desired ContentLength is {self.expected_length}"
                    )
                self._log.info("download_restart", status=status, done=offset)
                await self._restart()
                raise DownloadError(f"blob changed during download (HTTP {status})", permanent=False)
            if status in (401, 403):
                raise DownloadError(
                    f"access denied (HTTP {status}): the SAS token is expired or invalid", status=status
                )
            if status in (404, 410):
                raise DownloadError(f"not found (HTTP {status})", status=status)
            if status in _TRANSIENT_STATUS:
                raise DownloadError(f"HTTP {status}", permanent=False, status=status)
            if status not in (200, 206):
                raise DownloadError(f"unexpected HTTP {status}", status=status)

            etag = resp.headers.get("ETag")
            if status == 200:
                if offset:
                    # The whole blob instead of the rest (no range support, or If-Range saw a change):
                    # it replaces the kept bytes, and its bytes count from zero.
                    self._log.info("download_restart", status=status, done=offset)
                    await self._restart()
                    offset = 0
                total = resp.content_length
            else:
                match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if not match or int(match.group(1)) != offset:
                    raise DownloadError("server answered a different range", permanent=False)
                total = None if match.group(3) == "*" else int(match.group(3))
            if self.etag and etag and etag != self.etag:
                await self._restart()
                raise DownloadError("blob changed during download (new ETag)", permanent=False)
            note_needed = etag is not None and etag != self.etag
            if total is not None:
                if self.expected_length is not None and total != self.expected_length:
                    raise DownloadError(
                        f"length mismatch: server has {total} bytes, desired ContentLength is "
                        f"{self.expected_length}"
                    )
                if self.total is None:
                    self._check_free_space(total - self.bytes_done)
                self.total = total
            if note_needed:
                self.etag = etag
                await asyncio.to_thread(self._write_note)

            await self._stream(resp.content, offset)
            if self.total is None:
                # No length announced: the end of this body is the end of the file.
                self.total = self.bytes_done

    async def _stream(self, body: aiohttp.StreamReader, offset: int) -> None:
        """Copy the body to the sink. Reading and writing run as two tasks joined by a bounded queue:
        aiohttp drops the bytes still in its buffer when the connection breaks, so the reader keeps
        that buffer empty while the writer hashes and writes in a worker thread."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_CHUNKS)
        writer = asyncio.create_task(self._write_from(queue), name="download-writer")

        async def finish() -> None:
            if not writer.done():
                await queue.put(None)
            await writer  # raises the writer's error (a full disk) first

        received = offset
        try:
            async for chunk in body.iter_chunked(self._gate.read_size(self.chunk_size)):
                self.bytes_fetched += len(chunk)
                if self._counters is not None:
                    self._counters.fetched(len(chunk))
                received += len(chunk)
                if self.total is not None and received > self.total:
                    raise DownloadError(f"server sent more than the {self.total} bytes it announced")
                if writer.done() or not await _hand_to(writer, queue, chunk):
                    break  # the writer stopped (a full disk): finish() raises its error
                await self._gate.take(len(chunk))
        except asyncio.CancelledError:
            writer.cancel()
            await asyncio.wait([writer])
            raise
        except BaseException:
            await finish()  # keep every byte that did arrive: the resume starts after them
            raise
        await finish()

    async def _write_from(self, queue: asyncio.Queue[bytes | None]) -> None:
        while True:
            chunks = [await queue.get()]
            while not queue.empty() and chunks[-1] is not None:
                chunks.append(queue.get_nowait())
            data = b"".join(c for c in chunks if c is not None)
            if data:
                await asyncio.to_thread(self._sink.write, data)
                self.bytes_done += len(data)
                if self._progress is not None:
                    self._progress(self.bytes_done, self.total)
            if chunks[-1] is None:
                return

    def _check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.part_path.parent).free
        if free < needed + _FREE_SPACE_MARGIN:
            raise DownloadError(f"not enough disk space: {needed} bytes needed, {free} free")

    def _verify(self) -> DownloadResult:
        sink = self._sink
        if self.expected_length is not None and sink.size != self.expected_length:
            raise DownloadError(f"length mismatch: got {sink.size} bytes, expected {self.expected_length}")
        sha256 = sink.sha256.hexdigest()
        md5 = sink.md5.digest()
        if self.expected_sha256 is not None and sha256 != self.expected_sha256:
            raise DownloadError(f"SHA-256 mismatch: expected {self.expected_sha256}, got {sha256}")
        if self.expected_md5 is not None and md5 != self.expected_md5:
            raise DownloadError(
                f"MD5 mismatch: expected {base64.b64encode(self.expected_md5).decode()}, "
                f"got {base64.b64encode(md5).decode()}"
            )
        return DownloadResult(
            path=self.part_path,
            size=sink.size,
            sha256=sha256,
            md5=base64.b64encode(md5).decode(),
            bytes_fetched=self.bytes_fetched,
            attempts=self.attempts,
            etag=self.etag,
        )


async def _hand_to(writer: asyncio.Task[None], queue: asyncio.Queue[bytes | None], chunk: bytes) -> bool:
    """Queue ``chunk`` for ``writer``; False if the writer stops first. (Waiting on a full queue alone
    would wait for ever once the writer has died of a full disk: nothing takes from the queue any more.)"""
    if not queue.full():
        queue.put_nowait(chunk)
        return True
    put = asyncio.ensure_future(queue.put(chunk))
    await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
    if put.done():
        return True
    put.cancel()
    await asyncio.wait([put])
    return False


def _unsatisfiable_size(content_range: str) -> int | None:
    """The size a 416's ``Content-Range: bytes */<size>`` gives, if any."""
    match = _UNSATISFIED_RANGE.fullmatch(content_range.strip())
    return int(match.group(1)) if match else None
