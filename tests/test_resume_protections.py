"""What keeps a resumed download from splicing two different blobs together, each protection on its
own, against a real HTTP server (``blob_server``: aiohttp on loopback, behaving as Azure Blob Storage
unless told otherwise) and the fault proxy, with real HTTP and no mock of the client.

The downloads here carry no SHA-256 or MD5 on purpose: the hashes would catch a spliced file after
the fact, at the cost of a failed update (or a second download); these protections are what keeps
the bytes right in the first place. A spliced file shows as bytes that are not the blob's.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from waiting import eventually

from supervisor.twin.download import Download, DownloadError

if TYPE_CHECKING:
    from iot_fixtures import BlobServer, FaultProxy, SeenRequest

pytest_plugins = ["iot_fixtures"]

KiB = 1024


def blob_bytes(size: int, seed: str) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def fast(**overrides: object) -> dict[str, object]:
    options: dict[str, object] = {"retries": 50, "backoff_base": 0.02, "backoff_max": 0.05, "read_timeout": 5.0,
                                  "chunk_size": 16 * KiB}
    options.update(overrides)
    return options


async def cut_then_resume(download: Download, proxy: FaultProxy, cut_at: int) -> tuple[asyncio.Task[object], int]:
    """Start ``download`` through ``proxy``, cut its first connection after ``cut_at`` bytes and refuse
    connections, so that it keeps what it got and retries (refused) until the test lets it resume with
    ``proxy.online()``. Returns the running task and the bytes kept."""
    proxy.cut_after(cut_at, then_refuse=True)
    # Paced, so that the client reads as the bytes come: what sits unread in aiohttp's buffer when
    # the connection breaks is lost (a resume fetches it again), and a burst would leave nothing kept.
    proxy.throttle(4 * 1024 * KiB)
    task: asyncio.Task[object] = asyncio.create_task(download.run())  # type: ignore[arg-type]
    await eventually(lambda: download.attempts >= 2 or task.done(), 10, "a refused retry after the cut")
    assert not task.done()
    proxy.throttle(None)
    kept = download.bytes_done
    assert kept > 0
    return task, kept


async def test_a_resume_asks_for_the_same_blob_with_if_match_and_if_range(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    data = blob_bytes(512 * KiB, "same")
    etag = blob_server.put("m.zip", data)
    download = Download(blob_server.url("m.zip", via=blob_server_proxy), tmp_path / "m.zip.part", **fast())
    task, kept = await cut_then_resume(download, blob_server_proxy, 200 * KiB)
    blob_server_proxy.online()
    result = await task
    assert result.path.read_bytes() == data  # type: ignore[attr-defined]
    first, resume = blob_server.requests[0], blob_server.requests[-1]
    assert "Range" not in first.headers
    # Each condition on its own: If-Match makes Azure answer 412 to a changed blob; If-Range makes a
    # plain HTTP server send the whole new blob (200) instead of the rest of another one.
    assert resume.headers.get("Range") == f"bytes={kept}-"
    assert resume.headers.get("If-Match") == etag
    assert resume.headers.get("If-Range") == etag
    assert download.bytes_fetched == len(data)  # the rest only, not the whole blob again


async def test_a_206_with_another_etag_starts_over(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """A server that ignores If-Match and If-Range (many CDNs, old proxies) answers the resume with a
    206 of the *new* blob. Its ETag differs from the one the kept bytes came with: start over."""
    old, new = blob_bytes(512 * KiB, "old"), blob_bytes(512 * KiB, "new")  # same length on purpose
    blob_server.honour_conditions = False
    blob_server.put("m.zip", old)
    download = Download(blob_server.url("m.zip", via=blob_server_proxy), tmp_path / "m.zip.part", **fast())
    task, kept = await cut_then_resume(download, blob_server_proxy, 200 * KiB)
    blob_server.put("m.zip", new)
    blob_server_proxy.online()
    result = await task
    assert result.path.read_bytes() == new, "the old blob's bytes were spliced onto the new one"  # type: ignore[attr-defined]
    assert "Range" not in blob_server.requests[-1].headers  # the last request: from zero
    assert download.bytes_fetched == kept + len(new)  # the new blob once, whole


async def test_a_plain_200_to_a_range_request_starts_from_zero(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """A server without range support answers ``Range: bytes=N-`` with the whole blob (200): the body
    replaces the kept bytes, it is not appended to them."""
    data = blob_bytes(512 * KiB, "norange")
    blob_server.honour_range = False
    blob_server.put("m.zip", data)
    download = Download(blob_server.url("m.zip", via=blob_server_proxy), tmp_path / "m.zip.part", **fast())
    task, kept = await cut_then_resume(download, blob_server_proxy, 200 * KiB)
    blob_server_proxy.online()
    result = await task
    assert result.path.read_bytes() == data  # type: ignore[attr-defined]
    assert blob_server.requests[-1].headers.get("Range") == f"bytes={kept}-"  # it did ask for the rest
    assert download.bytes_fetched == kept + len(data)


async def test_a_resume_note_of_another_blob_is_not_reused(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """A download of blob A is interrupted (the service stops), leaving its .part and resume note. The
    next desired package has the same FileName but lives elsewhere (blob B). B's server gives the same
    ETag (plain servers derive ETags from size and time), so only the note's record of which blob it
    belongs to keeps A's bytes out of B's file."""
    a, b = blob_bytes(512 * KiB, "blob-a"), blob_bytes(512 * KiB, "blob-b")
    blob_server.put("a/m.zip", a, etag='"5f3e-1700000000"')
    blob_server.put("b/m.zip", b, etag='"5f3e-1700000000"')
    part = tmp_path / "m.zip.part"
    blob_server_proxy.throttle(256 * KiB)
    first = Download(blob_server.url("a/m.zip", via=blob_server_proxy), part, **fast())
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.bytes_done > 64 * KiB, 10, "part of blob A")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (tmp_path / ".m.zip.resume").is_file() and part.stat().st_size > 0  # kept for a resume
    blob_server_proxy.throttle(None)

    second = Download(blob_server.url("b/m.zip"), part, **fast())
    result = await second.run()
    assert result.path.read_bytes() == b, "blob A's bytes were kept as the start of blob B"
    assert second.resumed_bytes == 0 and "Range" not in blob_server.requests[-1].headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_md5_only_still_checks_the_length(
    tmp_path: Path, blob_server: BlobServer, chunked: bool,
) -> None:
    """The twin gives ContentMD5 and ContentLength (no SHA-256). The blob matches the MD5 but is one byte
    shorter than ContentLength: refused for its length, at once, whether the server announces its
    length or sends the body chunked (then a resume finds nothing beyond the end: 416 with the size)."""
    data = blob_bytes(300 * KiB, "md5")
    blob_server.chunked = chunked
    blob_server.put("m.zip", data)
    md5 = hashlib.md5(data).digest()
    download = Download(blob_server.url("m.zip"), tmp_path / "m.zip.part", expected_length=len(data) + 1,
                        md5=md5, **fast())
    with pytest.raises(DownloadError, match="length mismatch") as err:
        await download.run()
    assert err.value.permanent
    assert download.attempts <= 2, "the short blob was fetched again and again"
    assert download.bytes_fetched <= len(data)
    assert list(tmp_path.iterdir()) == []


async def test_a_blob_that_keeps_changing_is_given_up_on(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """ETags that change on every request (replicas behind a load balancer that disagree): each resume
    restarts; the restarts are counted, and the download gives up instead of fetching for ever."""
    data = blob_bytes(256 * KiB, "flap")
    blob_server.honour_conditions = False
    blob_server.put("m.zip", data)
    download = Download(blob_server.url("m.zip", via=blob_server_proxy), tmp_path / "m.zip.part",
                        **fast(retries=3))

    def flap(_request: SeenRequest) -> None:
        blob_server.put("m.zip", data)  # a new ETag for every request
        blob_server_proxy.cut_after(100 * KiB)  # and the next transfer is cut short again

    blob_server.on_request = flap
    blob_server_proxy.cut_after(100 * KiB)
    blob_server_proxy.throttle(4 * 1024 * KiB)  # so that each cut transfer keeps its bytes
    with pytest.raises(DownloadError, match="gave up") as err:
        await asyncio.wait_for(download.run(), 15)  # a guard: without a bound this never ends
    assert not err.value.permanent and download.attempts <= 10


async def test_a_kept_part_with_junk_at_its_end_is_fetched_again(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """A power cut can leave junk at the end of a kept .part (pages written, size updated, data lost).
    The resumed file fails its SHA-256: it is fetched once more, whole, and the result is right."""
    data = blob_bytes(512 * KiB, "junk")
    sha = hashlib.sha256(data).hexdigest()
    blob_server.put("m.zip", data)
    part = tmp_path / "m.zip.part"
    blob_server_proxy.throttle(256 * KiB)
    first = Download(blob_server.url("m.zip", via=blob_server_proxy), part, sha256=sha, **fast())
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.bytes_done > 64 * KiB, 10, "part of the blob")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = part.stat().st_size
    with part.open("r+b") as f:  # the last 4 KiB of what was kept: zeros, as after a power cut
        f.seek(kept - 4096)
        f.write(bytes(4096))
    blob_server_proxy.throttle(None)
    second = Download(blob_server.url("m.zip", via=blob_server_proxy), part, sha256=sha, **fast())
    result = await second.run()
    assert result.path.read_bytes() == data
    assert second.resumed_bytes == 0  # counted afresh after the retry
    assert second.bytes_fetched == (len(data) - kept) + len(data)  # the rest, then all of it again


async def test_a_busy_server_is_retried_and_a_refusal_is_final(tmp_path: Path, blob_server: BlobServer) -> None:
    data = blob_bytes(100 * KiB, "busy")
    blob_server.put("m.zip", data)
    blob_server.statuses = [503, 429]
    result = await Download(blob_server.url("m.zip"), tmp_path / "a.part", **fast()).run()
    assert result.path.read_bytes() == data and result.attempts == 3
    blob_server.statuses = [400]
    refused = Download(blob_server.url("m.zip"), tmp_path / "b.part", **fast())
    with pytest.raises(DownloadError, match="unexpected HTTP 400") as err:
        await refused.run()
    assert err.value.permanent and refused.attempts == 1


async def test_a_206_of_another_range_is_not_appended(
    tmp_path: Path, blob_server: BlobServer, blob_server_proxy: FaultProxy,
) -> None:
    """A broken server answers ``Range: bytes=N-`` with a 206 of the whole blob (and says so): those
    bytes are not the rest. The download retries, a bounded number of times, and never splices them."""
    data = blob_bytes(512 * KiB, "range")
    blob_server.put("m.zip", data)
    download = Download(blob_server.url("m.zip", via=blob_server_proxy), tmp_path / "m.zip.part", **fast(retries=2))
    task, kept = await cut_then_resume(download, blob_server_proxy, 200 * KiB)
    blob_server.wrong_range = True
    blob_server_proxy.online()
    with pytest.raises(DownloadError, match="server answered a different range"):
        await task
    assert download.bytes_fetched == kept  # nothing of the wrong range was taken


async def test_a_body_longer_than_the_desired_length_is_cut_off(tmp_path: Path, blob_server: BlobServer) -> None:
    """The desired ContentLength is 100 KiB; the blob, sent without a length, is 4 MiB: the download stops
    as soon as the body passes the length, instead of filling the disk and checking afterwards."""
    blob_server.chunked = True
    blob_server.put("m.zip", blob_bytes(4 * 1024 * KiB, "long"))
    download = Download(blob_server.url("m.zip"), tmp_path / "m.zip.part", expected_length=100 * KiB, **fast())
    with pytest.raises(DownloadError, match="server sent more than the 102400 bytes") as err:
        await download.run()
    assert err.value.permanent
    assert download.bytes_fetched < 1024 * KiB


async def test_a_full_disk_stops_the_transfer_and_fails_with_the_reason(
    tmp_path: Path, blob_server: BlobServer,
) -> None:
    """The disk fills up half-way (here: a file-size limit on this process, which writes hit as they
    would a full disk): the download stops reading at once, instead of fetching the rest for nothing or
    waiting for ever to hand the writer a chunk it will never take, and fails with the system's reason."""
    import resource
    import signal

    data = blob_bytes(8 * 1024 * KiB, "full")
    blob_server.put("m.zip", data)
    download = Download(blob_server.url("m.zip"), tmp_path / "m.zip.part", **fast())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * KiB, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            await asyncio.wait_for(download.run(), 30)  # a guard: it used to hang, on a full queue
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert download.bytes_fetched < 4 * 1024 * KiB, "the rest of the blob was fetched after the disk was full"
