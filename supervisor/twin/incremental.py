"""Fetch only what the device does not hold: a package assembled from its stored versions and Range
requests against the same blob.

A package written by ``edgeloader pack`` ends with an index of its big files' chunks
(package/indexed.py). ``IncrementalDownload``:

1. reads the blob's tail with one Range request (the central directory and, usually, the index;
   one more request when the index is bigger than the tail read), remembering the blob's ETag;
2. cuts the files of the stored versions with the index's chunking (cached, seeds.py) and, for every
   chunk of the new package it finds there, deflates it again and writes it where the index says
   into ``<staging>/<FileName>.part`` (a chunk whose deflated bytes come out different, from another
   zlib, is left to fetch);
3. fetches everything else with Range requests (adjacent ones merged, at most ``max_requests``), each
   with ``If-Match`` on the ETag, writing at their offsets;
4. checks the length, SHA-256 and MD5 of the whole file against the twin's, exactly as a whole
   download does, and returns the same ``DownloadResult``.

Progress is kept in the ``.<FileName>.resume`` note (the plan and how far each range got, written
after an fsync of the part file), so a cut, a closed download window or a restart continues where it
stopped. Whenever this cannot help (no stored version, a small package, no index, a blob that changed,
a server that ignores Range, little to reuse, a result that does not verify) it hands over to the
whole-file ``Download`` and its own resume; the bytes spent on the tail are all it costs.
Memory: one chunk at a time (at most the index's maximum chunk size, 256 KiB as packed) and one
network read; the whole file is hashed at the end from disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog

from supervisor.package.chunking import digest
from supervisor.package.indexed import (
    IndexedChunk,
    PackageIndex,
    TailLayout,
    encode_chunk,
    parse_index_record,
    parse_tail,
)
from supervisor.redact import redact_url
from supervisor.twin.download import (
    _CONTENT_RANGE,
    _FREE_SPACE_MARGIN,
    _TRANSIENT_STATUS,
    Download,
    DownloadCounters,
    DownloadError,
    DownloadResult,
)
from supervisor.twin.gate import Gate, WindowClosed
from supervisor.twin.partfile import resume_note_path
from supervisor.twin.seeds import LocalChunk, local_chunks

__all__ = ["IncrementalDownload", "coalesce"]

log = structlog.get_logger(__name__)

# Below this size a package is fetched whole: the tail read would cost more than it can save.
MIN_PACKAGE_BYTES = 1 << 20
# Less than this fraction of the package reusable: fetch it whole (one request, its own resume).
MIN_REUSE_FRACTION = 0.10
# Holes between ranges to fetch smaller than this are fetched too (a request costs about as much).
MERGE_GAP = 1024
# Progress is made durable (fsync + note) at least every this many bytes of a range.
_NOTE_EVERY = 1 << 20


class _UseWholeDownload(Exception):
    """This package or this server does not lend itself to an incremental fetch."""


def coalesce(missing: list[tuple[int, int]], max_requests: int, merge_gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """Merge sorted, disjoint [start, end) ranges: those with a hole of less than ``merge_gap`` between
    them, then the closest pairs until at most ``max_requests`` remain (refetching the holes)."""
    ranges: list[list[int]] = []
    for start, end in missing:
        if ranges and start - ranges[-1][1] < merge_gap:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    while len(ranges) > max(1, max_requests):
        i = min(range(len(ranges) - 1), key=lambda k: ranges[k + 1][0] - ranges[k][1])
        ranges[i][1] = ranges[i + 1][1]
        del ranges[i + 1]
    return [(s, e) for s, e in ranges]


def tail_size(total: int) -> int:
    """Bytes read from the end: the central directory and the index (about 0.1% of a package) fit."""
    return min(total, max(16 * 1024, min(256 * 1024, total // 256)))


class IncrementalDownload:
    """One download of ``url`` into ``part_path`` that reuses the chunks of ``seeds()`` (the stored
    files, (path, SHA-256) pairs). Same results and errors as ``Download``; read ``bytes_fetched``,
    ``bytes_reused``, ``bytes_needed``, ``bytes_done``, ``total`` live."""

    def __init__(
        self,
        url: str,
        part_path: Path,
        *,
        seeds: Callable[[], list[tuple[Path, str]]],
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
        gate: Gate | None = None,
        counters: DownloadCounters | None = None,
        max_requests: int = 32,
        min_reuse: float = MIN_REUSE_FRACTION,
        min_package: int = MIN_PACKAGE_BYTES,
    ) -> None:
        self.url = url
        self.part_path = part_path
        self.resume_path = resume_note_path(part_path)
        self.expected_length = expected_length
        self.expected_sha256 = sha256
        self.expected_md5 = md5
        self._seeds = seeds
        self._session = session
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._progress = progress
        self._gate = gate or Gate()
        self.max_requests = max_requests
        self.min_reuse = min_reuse
        self.min_package = min_package
        self._counters = counters
        self._download_options: dict[str, Any] = {
            "chunk_size": chunk_size, "retries": retries, "backoff_base": backoff_base,
            "backoff_max": backoff_max, "connect_timeout": connect_timeout, "read_timeout": read_timeout,
            "counters": counters,
        }
        self._total: int | None = expected_length
        self.etag: str | None = None
        # This object's own counters; the properties add the whole download's, once there is one.
        self._attempts = 0
        self._fetched = 0
        self._reused = 0
        self._done = 0
        self._resumed = 0
        self.requests: list[tuple[int, int]] = []  # the ranges requested by this run (tests, diagnostics)
        self.whole: Download | None = None  # the whole-file download, when it came to that
        self.ranges: list[list[int]] = []  # [start, end, done] of each range to fetch
        self._planned_fetch = 0
        self._identity = {
            "blob": redact_url(url).split("?", 1)[0], "sha256": sha256, "length": expected_length,
            "mode": "incremental",
        }
        self._log = log.bind(url=redact_url(url), file=part_path.name)

    @property
    def attempts(self) -> int:
        """HTTP requests made."""
        return self._attempts + (self.whole.attempts if self.whole else 0)

    @property
    def bytes_fetched(self) -> int:
        """Body bytes received by this run."""
        return self._fetched + (self.whole.bytes_fetched if self.whole else 0)

    @property
    def bytes_reused(self) -> int:
        """Package bytes taken from stored versions."""
        return 0 if self.whole else self._reused

    @property
    def bytes_done(self) -> int:
        """Package bytes in place."""
        return self.whole.bytes_done if self.whole else self._done

    @property
    def resumed_bytes(self) -> int:
        """Bytes in place from an earlier, interrupted run."""
        return self.whole.resumed_bytes if self.whole else self._resumed

    @property
    def total(self) -> int | None:
        return self.whole.total if self.whole else self._total

    @property
    def mode(self) -> str:
        return "whole" if self.whole is not None else "incremental"

    @property
    def bytes_needed(self) -> int | None:
        """Bytes this run brings over the link (planned; a whole download's remaining size)."""
        if self.whole is not None:
            needed = self.whole.bytes_needed
            return None if needed is None else needed + self._planned_fetch
        return self._planned_fetch

    # ----------------------------------------------------------------------------------------- run
    async def run(self) -> DownloadResult:
        own_session = self._session is None
        session = self._session or aiohttp.ClientSession(trust_env=True)  # proxies, as download.py
        try:
            try:
                planned = await self._start(session)
            except _UseWholeDownload as exc:
                self._log.info("incremental_download_skipped", reason=str(exc))
                planned = False
            if not planned:
                return await self._whole_download(session)
            try:
                await self._fetch_ranges(session)
            except _UseWholeDownload as exc:
                self._log.info("incremental_download_abandoned", reason=str(exc))
                await asyncio.to_thread(self._discard)
                return await self._whole_download(session)
            try:
                result = await asyncio.to_thread(self._verify)
            except DownloadError as exc:
                # Whatever went wrong (a stored file damaged on disk, a lying index), the whole file does it.
                self._log.warning("incremental_download_unverified", reason=exc.reason)
                await asyncio.to_thread(self._discard)
                return await self._whole_download(session)
        except asyncio.CancelledError:
            # Kept when a plan is noted (the note says what is durable); the whole download keeps its own.
            if self.whole is None and not (self.ranges and self.resume_path.exists()):
                await asyncio.shield(asyncio.to_thread(self._discard))
            raise
        except BaseException:
            if self.whole is None:
                await asyncio.shield(asyncio.to_thread(self._discard))
            raise
        finally:
            if own_session:
                await session.close()
        await asyncio.to_thread(self.resume_path.unlink, missing_ok=True)
        self._log.info(
            "download_verified", size=result.size, sha256=result.sha256, bytes_fetched=self.bytes_fetched,
            bytes_reused=self.bytes_reused, attempts=self.attempts, requests=len(self.requests),
            resumed_from=self.resumed_bytes or None, mode="incremental",
        )
        return result

    async def _whole_download(self, session: aiohttp.ClientSession) -> DownloadResult:
        self.whole = Download(
            self.url, self.part_path, expected_length=self.expected_length, sha256=self.expected_sha256,
            md5=self.expected_md5, session=session, progress=self._progress, gate=self._gate,
            **self._download_options,
        )
        return await self.whole.run()

    # ---------------------------------------------------------------------------------------- plan
    async def _start(self, session: aiohttp.ClientSession) -> bool:
        """Resume a plan, or make one; False: download whole (after a whole download's note, to let
        it resume)."""
        note = await asyncio.to_thread(self._read_note)
        if note is not None and note.get("identity") == self._identity:
            if await asyncio.to_thread(self._resume, note):
                return True
        elif note is not None and note.get("identity") == {k: v for k, v in self._identity.items() if k != "mode"}:
            return False  # a whole download of this blob was under way: let it resume
        await asyncio.to_thread(self._discard)
        total = self.expected_length
        if total is None or total < self.min_package:
            raise _UseWholeDownload("package too small or of unknown size")
        files = await asyncio.to_thread(self._seeds)
        if not files:
            raise _UseWholeDownload("no stored version to reuse")
        free = (await asyncio.to_thread(shutil.disk_usage, self.part_path.parent)).free
        if free < total + _FREE_SPACE_MARGIN:
            raise DownloadError(f"not enough disk space: {total} bytes needed, {free} free")

        tail_start = total - tail_size(total)
        tail = await self._get_bytes(session, tail_start, total)
        try:
            layout = parse_tail(tail, tail_start, total)
        except Exception as exc:  # ValueError, struct.error: a truncated or foreign tail
            raise _UseWholeDownload(f"no readable zip tail: {exc}") from None
        if layout.record is None:
            raise _UseWholeDownload("the package has no chunk index (packed without one)")
        record_start, record_end = layout.record
        have_from = tail_start
        if record_start < tail_start:
            head = await self._get_bytes(session, record_start, tail_start)
            tail, have_from = head + tail, record_start
        try:
            index = parse_index_record(tail[record_start - have_from: record_end - have_from], total)
        except Exception as exc:  # ValueError, struct.error, zlib.error
            raise _UseWholeDownload(f"unusable chunk index: {exc}") from None
        wanted = {c.raw_digest for c in index.chunks()}
        found = await asyncio.to_thread(local_chunks, files, index.params, wanted, self.part_path.parent)
        reusable = sum(c.length for c in index.chunks() if c.raw_digest in found)
        self._log.info("incremental_plan", chunks=sum(1 for _ in index.chunks()), reusable=reusable, total=total)
        if reusable < self.min_reuse * total:
            raise _UseWholeDownload(f"only {reusable} of {total} bytes reusable")
        await asyncio.to_thread(self._assemble, index, found, tail, have_from, layout)
        self._progress_now()
        return True

    def _assemble(self, index: PackageIndex, found: dict[str, LocalChunk], tail: bytes, have_from: int,
                  layout: TailLayout) -> None:
        """Write the known bytes into a fresh part file, plan the rest, note it. Blocking."""
        total = self.total
        assert total is not None
        have: list[tuple[int, int]] = [(have_from, total)]
        with open(self.part_path, "wb") as out:
            out.truncate(total)
            out.seek(have_from)
            out.write(tail)
            have += self._reuse(out, index, found)
            out.flush()
            os.fsync(out.fileno())
        have.sort()
        missing, pos = [], 0
        for start, end in have:
            if start > pos:
                missing.append((pos, start))
            pos = max(pos, end)
        self.ranges = [[s, e, 0] for s, e in coalesce(missing, self.max_requests)]
        self._planned_fetch += sum(e - s for s, e, _ in self.ranges)
        self._done = total - sum(e - s for s, e, _ in self.ranges)
        self._write_note()

    def _reuse(self, out: BinaryIO, index: PackageIndex, found: dict[str, LocalChunk]) -> list[tuple[int, int]]:
        written: list[tuple[int, int]] = []
        files: dict[Path, BinaryIO] = {}
        mismatched = 0
        try:
            for chunk in index.chunks():
                local = found.get(chunk.raw_digest)
                if local is None:
                    continue
                packed = self._packed(local, chunk, files)
                if packed is None:
                    mismatched += 1
                    continue
                out.seek(chunk.offset)
                out.write(packed)
                written.append((chunk.offset, chunk.offset + chunk.length))
                self._reused += chunk.length
                if self._counters is not None:
                    self._counters.reused(chunk.length)
        finally:
            for f in files.values():
                f.close()
        if mismatched:
            # Another zlib deflates differently: those chunks are fetched. Costs bytes, not correctness.
            self._log.info("reused_chunks_differ", chunks=mismatched)
        return written

    @staticmethod
    def _packed(local: LocalChunk, chunk: IndexedChunk, files: dict[Path, BinaryIO]) -> bytes | None:
        try:
            f = files.get(local.path)
            if f is None:
                f = files[local.path] = open(local.path, "rb")  # noqa: SIM115 - closed by the caller
            f.seek(local.offset)
            raw = f.read(local.length)
        except OSError:
            return None
        if len(raw) != chunk.raw_length or digest(raw) != chunk.raw_digest:
            return None  # the stored file changed under its cache entry
        packed = encode_chunk(raw)
        if len(packed) != chunk.length or digest(packed) != chunk.digest:
            return None
        return packed

    # --------------------------------------------------------------------------------------- notes
    def _read_note(self) -> dict[str, Any] | None:
        try:
            note = json.loads(self.resume_path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return note if isinstance(note, dict) else None

    def _resume(self, note: dict[str, Any]) -> bool:
        ranges, total, etag = note.get("ranges"), note.get("total"), note.get("etag")
        try:
            ok = (
                isinstance(etag, str) and isinstance(total, int) and total == self.expected_length
                and isinstance(ranges, list) and self.part_path.stat().st_size == total
                and all(isinstance(r, list) and len(r) == 3 and 0 <= r[0] <= r[0] + r[2] <= r[1] <= total
                        and all(isinstance(x, int) for x in r) for r in ranges)
            )
        except OSError:
            ok = False
        if not ok or not isinstance(ranges, list) or not isinstance(total, int) or not isinstance(etag, str):
            return False
        self.etag, self._total, self.ranges = etag, total, ranges
        self._reused = int(note.get("reused") or 0)
        remaining = sum(e - s - d for s, e, d in ranges)
        self._done = self._resumed = total - remaining
        self._planned_fetch = remaining
        if self._counters is not None:
            self._counters.resumed()
        self._log.info("download_resuming", kept=self.bytes_done, total=total, mode="incremental")
        return True

    def _write_note(self) -> None:
        note = {"identity": self._identity, "etag": self.etag, "total": self.total, "ranges": self.ranges,
                "reused": self.bytes_reused}
        tmp = self.resume_path.with_name(self.resume_path.name + ".part")
        tmp.write_text(json.dumps(note), "utf-8")
        os.replace(tmp, self.resume_path)

    def _discard(self) -> None:
        self.part_path.unlink(missing_ok=True)
        self.resume_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------- network
    def _progress_now(self) -> None:
        if self._progress is not None:
            self._progress(self.bytes_done, self.total)

    def _headers(self, start: int, end: int) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={start}-{end - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        return headers

    async def _get_bytes(self, session: aiohttp.ClientSession, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob, into memory (the tail: small)."""
        parts: list[bytes] = []

        async def keep(offset: int, data: bytes) -> None:
            parts.append(data)

        await self._get_range(session, start, end, keep)
        data = b"".join(parts)
        self._planned_fetch += len(data)
        return data

    async def _get_range(
        self, session: aiohttp.ClientSession, start: int, end: int, sink: Callable[[int, bytes], Any]
    ) -> None:
        """Fetch [start, end) into ``sink(offset, data)``, resuming after cuts (bounded retries with
        capped backoff and jitter), pausing outside the download windows."""
        cursor = [start]  # moved by _attempt as bytes arrive, so a cut keeps them
        failures = 0
        while cursor[0] < end:
            await self._gate.wait_open()
            before = cursor[0]
            try:
                await self._attempt(session, cursor, end, sink)
                if cursor[0] < end:
                    raise DownloadError("connection closed before the end of the range", permanent=False)
            except WindowClosed:
                self._log.info("download_paused", done=self.bytes_done, total=self.total)
                continue
            except DownloadError as exc:
                if exc.permanent:
                    raise
                reason = exc.reason
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                continue
            failures = 0 if cursor[0] > before else failures + 1
            if failures > self.retries:
                raise DownloadError(f"gave up after {self.attempts} attempts: {reason}", permanent=False)
            delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)
            self._log.warning("download_retry", reason=reason, done=self.bytes_done, total=self.total,
                              delay=round(delay, 2))
            await asyncio.sleep(delay)

    async def _attempt(self, session: aiohttp.ClientSession, cursor: list[int], end: int,
                       sink: Callable[[int, bytes], Any]) -> None:
        pos = cursor[0]
        self._attempts += 1
        self.requests.append((pos, end))
        async with session.get(self.url, headers=self._headers(pos, end), timeout=self._timeout,
                               auto_decompress=False) as resp:
            status = resp.status
            if status == 412:
                raise _UseWholeDownload("the blob changed (HTTP 412)")
            if status in (401, 403):
                raise DownloadError(f"access denied (HTTP {status}): the SAS token is expired or invalid",
                                    status=status)
            if status in (404, 410):
                raise DownloadError(f"not found (HTTP {status})", status=status)
            if status in _TRANSIENT_STATUS:
                raise DownloadError(f"HTTP {status}", permanent=False, status=status)
            if status in (200, 416):
                raise _UseWholeDownload(f"the server does not serve this range (HTTP {status})")
            if status != 206:
                raise DownloadError(f"unexpected HTTP {status}", status=status)
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != pos:
                raise DownloadError("server answered a different range", permanent=False)
            if match.group(3) != "*" and int(match.group(3)) != self.expected_length:
                raise DownloadError(f"length mismatch: server has {match.group(3)} bytes, desired ContentLength "
                                    f"is {self.expected_length}")
            etag = resp.headers.get("ETag")
            if self.etag is None:
                if not etag or etag.startswith("W/"):
                    raise _UseWholeDownload("the server gives no strong ETag")
                self.etag = etag
            elif etag and etag != self.etag:
                raise _UseWholeDownload("the blob changed (new ETag)")
            async for data in resp.content.iter_chunked(self._gate.read_size(self.chunk_size)):
                if pos + len(data) > end:
                    raise DownloadError("server sent more than the range asked for")
                self._fetched += len(data)
                if self._counters is not None:
                    self._counters.fetched(len(data))
                await sink(pos, data)
                pos = cursor[0] = pos + len(data)
                await self._gate.take(len(data))

    async def _fetch_ranges(self, session: aiohttp.ClientSession) -> None:
        out = await asyncio.to_thread(open, self.part_path, "r+b")
        try:
            for r in self.ranges:
                start, end, done = r
                if start + done >= end:
                    continue
                noted = start + done

                async def write(offset: int, data: bytes, r: list[int] = r) -> None:
                    await asyncio.to_thread(_write_at, out, offset, data)
                    self._done += len(data)
                    r[2] = offset + len(data) - r[0]
                    self._progress_now()

                async def durable(pos: int, r: list[int] = r) -> None:
                    nonlocal noted
                    if pos - noted >= _NOTE_EVERY or pos >= r[1]:
                        await asyncio.to_thread(self._sync_note, out)
                        noted = pos

                async def sink(offset: int, data: bytes) -> None:
                    await write(offset, data)
                    await durable(offset + len(data))

                try:
                    await self._get_range(session, start + done, end, sink)
                finally:
                    await asyncio.shield(asyncio.to_thread(self._sync_note, out))
        finally:
            await asyncio.shield(asyncio.to_thread(out.close))

    def _sync_note(self, out: BinaryIO) -> None:
        out.flush()
        os.fsync(out.fileno())
        self._write_note()

    # -------------------------------------------------------------------------------------- verify
    def _verify(self) -> DownloadResult:
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        with open(self.part_path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                md5.update(block)
                size += len(block)
        if self.expected_length is not None and size != self.expected_length:
            raise DownloadError(f"length mismatch: got {size} bytes, expected {self.expected_length}")
        if self.expected_sha256 is not None and sha.hexdigest() != self.expected_sha256:
            raise DownloadError(f"SHA-256 mismatch: expected {self.expected_sha256}, got {sha.hexdigest()}")
        if self.expected_md5 is not None and md5.digest() != self.expected_md5:
            raise DownloadError("MD5 mismatch")
        return DownloadResult(
            path=self.part_path, size=size, sha256=sha.hexdigest(), md5=base64.b64encode(md5.digest()).decode(),
            bytes_fetched=self.bytes_fetched, attempts=self.attempts, etag=self.etag,
        )


def _write_at(out: BinaryIO, offset: int, data: bytes) -> None:
    out.seek(offset)
    out.write(data)
