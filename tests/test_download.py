"""Resumable, verified downloads against the real Azure Blob emulator (Azurite) and a fault proxy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from waiting import eventually

from supervisor.twin.download import Download, DownloadError, parse_md5, parse_sha256
from supervisor.twin.partfile import commit

pytest_plugins = ["iot_fixtures"]

MiB = 1024 * 1024




def _package(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not compressible by accident
    return (block * (size // len(block) + 1))[:size]


def _fast(**overrides: object) -> dict[str, object]:
    options: dict[str, object] = {"retries": 3, "backoff_base": 0.05, "backoff_max": 0.2, "read_timeout": 5.0}
    options.update(overrides)
    return options


def test_parse_hashes() -> None:
    data = b"model bytes"
    md5 = hashlib.md5(data).digest()
    assert parse_md5(base64.b64encode(md5).decode()) == md5
    assert parse_md5(md5.hex().upper()) == md5
    assert parse_sha256(hashlib.sha256(data).hexdigest().upper()) == hashlib.sha256(data).hexdigest()
    for bad in ("", "abc", base64.b64encode(b"x" * 15).decode()):
        with pytest.raises(ValueError):
            parse_md5(bad)
    with pytest.raises(ValueError):
        parse_sha256("ab" * 31)


async def test_download_verifies_and_commit_hands_over(tmp_path: Path, blob_store) -> None:
    data = _package(3 * MiB + 17)
    props = blob_store.upload("model-1.0.zip", data)
    azure_md5 = base64.b64encode(bytes(props["content_settings"]["content_md5"])).decode()
    assert azure_md5 == base64.b64encode(hashlib.md5(data).digest()).decode()  # as the twin carries it
    part = tmp_path / "model-1.0.zip.part"
    done: list[int] = []
    download = Download(
        blob_store.sas_url("model-1.0.zip"), part, expected_length=len(data),
        sha256=hashlib.sha256(data).hexdigest(), md5=parse_md5(azure_md5),
        progress=lambda d, t: done.append(d), **_fast(),
    )
    result = await download.run()
    assert result.path == part and part.read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.md5 == azure_md5
    assert (result.attempts, result.bytes_fetched, result.size) == (1, len(data), len(data))
    assert done[-1] == len(data) and done == sorted(done)

    dest = tmp_path / "model-1.0.zip"
    commit(part, dest, {"source": "twin", "sha256": result.sha256, "activate": True})
    assert dest.read_bytes() == data and not part.exists()
    assert json.loads((tmp_path / "model-1.0.zip.intent.json").read_text())["sha256"] == result.sha256
    assert sorted(os.listdir(tmp_path)) == ["model-1.0.zip", "model-1.0.zip.intent.json"]


async def test_cut_at_half_resumes_without_refetching(tmp_path: Path, blob_store, blob_proxy) -> None:
    data = _package(4 * MiB + 123)
    blob_store.upload("big.zip", data)
    blob_proxy.cut_after(len(data) // 2)  # the first connection ends (FIN) half way through the body
    chunk = 64 * 1024
    download = Download(
        blob_store.sas_url("big.zip", via=blob_proxy), tmp_path / "big.zip.part",
        expected_length=len(data), sha256=hashlib.sha256(data).hexdigest(), chunk_size=chunk, **_fast(),
    )
    result = await download.run()
    assert result.path.read_bytes() == data
    assert result.attempts == 2 and blob_proxy.connections == 2
    # Resumed with Range, not restarted: the network carried the package once (within one chunk).
    assert len(data) <= result.bytes_fetched <= len(data) + chunk
    print(f"resume: package {len(data)} B, fetched {result.bytes_fetched} B, "
          f"proxy carried {blob_proxy.bytes_down} B with headers")


async def test_blob_replaced_during_cut_starts_over(tmp_path: Path, blob_store, blob_proxy) -> None:
    old, new = _package(2 * MiB, seed=1), _package(2 * MiB + 5, seed=2)
    blob_store.upload("m.zip", old)
    # The first connection is cut and the proxy then refuses connections: the download keeps bytes
    # it got and retries (refused) until the blob has been replaced. No timing involved.
    blob_proxy.cut_after(MiB, then_refuse=True)
    url = blob_store.sas_url("m.zip", via=blob_proxy)
    download = Download(url, tmp_path / "m.zip.part", **_fast(retries=50, backoff_base=0.05, backoff_max=0.1))
    task = asyncio.create_task(download.run())
    await eventually(lambda: download.attempts >= 2 or task.done(), 10, "a refused retry after the cut")
    kept = download.bytes_done
    assert not task.done() and 0 < kept < len(old)
    blob_store.upload("m.zip", new)  # the ETag changes before the resume: If-Match answers 412
    blob_proxy.online()
    result = await task
    assert result.path.read_bytes() == new and result.sha256 == hashlib.sha256(new).hexdigest()
    # Started over: the old bytes were dropped and the whole new blob fetched (after a 412 to
    # If-Match, or a 200 to If-Range; either is a correct answer from the server).
    assert result.bytes_fetched == kept + len(new) and blob_proxy.connections >= 2


async def test_expired_sas_fails_at_once(tmp_path: Path, blob_store) -> None:
    blob_store.upload("m.zip", b"x" * 1000)
    download = Download(blob_store.sas_url("m.zip", expires_in=-60), tmp_path / "m.zip.part", **_fast())
    with pytest.raises(DownloadError) as err:
        await download.run()
    assert err.value.permanent and err.value.status == 403 and "SAS" in err.value.reason
    assert download.attempts == 1 and not (tmp_path / "m.zip.part").exists()
    assert "sig=" not in str(err.value.reason)


async def test_missing_blob_fails_at_once(tmp_path: Path, blob_store) -> None:
    download = Download(blob_store.sas_url("nope.zip"), tmp_path / "nope.zip.part", **_fast())
    with pytest.raises(DownloadError) as err:
        await download.run()
    assert err.value.status == 404 and download.attempts == 1 and "not found" in err.value.reason


async def test_wrong_checksum_fails_and_leaves_nothing(tmp_path: Path, blob_store) -> None:
    data = _package(300_000)
    blob_store.upload("m.zip", data)
    download = Download(blob_store.sas_url("m.zip"), tmp_path / "m.zip.part",
                        sha256=hashlib.sha256(b"other").hexdigest(), **_fast())
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        await download.run()
    assert download.attempts == 1 and os.listdir(tmp_path) == []
    md5_wrong = Download(blob_store.sas_url("m.zip"), tmp_path / "m.zip.part",
                         md5=hashlib.md5(b"other").digest(), **_fast())
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        await md5_wrong.run()


async def test_length_mismatch_and_disk_space_fail_before_the_body(tmp_path: Path, blob_store) -> None:
    data = _package(200_000)
    blob_store.upload("m.zip", data)
    short = Download(blob_store.sas_url("m.zip"), tmp_path / "m.zip.part", expected_length=len(data) - 1,
                     **_fast())
    with pytest.raises(DownloadError, match="length mismatch"):
        await short.run()
    assert short.bytes_fetched == 0
    huge = Download(blob_store.sas_url("m.zip"), tmp_path / "m.zip.part", expected_length=2**60, **_fast())
    with pytest.raises(DownloadError, match="not enough disk space"):
        await huge.run()
    assert huge.attempts == 0


async def test_unreachable_server_gives_up_after_bounded_retries(tmp_path: Path, blob_store,
                                                                 blob_proxy) -> None:
    blob_store.upload("m.zip", b"abc")
    blob_proxy.refuse()
    started = time.monotonic()
    download = Download(blob_store.sas_url("m.zip", via=blob_proxy), tmp_path / "m.zip.part",
                        **_fast(retries=3))
    with pytest.raises(DownloadError, match="gave up after 4 attempts") as err:
        await download.run()
    assert not err.value.permanent and time.monotonic() - started < 5


async def test_stalled_transfer_times_out_and_resumes(tmp_path: Path, blob_store, blob_proxy) -> None:
    data = _package(MiB)
    blob_store.upload("m.zip", data)
    blob_proxy.stall_after(300_000)
    download = Download(blob_store.sas_url("m.zip", via=blob_proxy), tmp_path / "m.zip.part",
                        sha256=hashlib.sha256(data).hexdigest(), **_fast(read_timeout=0.5))
    started = time.monotonic()
    result = await download.run()
    assert result.attempts == 2 and result.bytes_fetched <= len(data) + 64 * 1024
    assert time.monotonic() - started < 5


async def test_cancelled_download_resumes_in_a_later_run(tmp_path: Path, blob_store, blob_proxy) -> None:
    """The service stops mid-download; after the restart only the rest is fetched (even with a new SAS)."""
    data = _package(MiB)
    blob_store.upload("m.zip", data)
    blob_proxy.throttle(400_000)
    part = tmp_path / "m.zip.part"
    sha = hashlib.sha256(data).hexdigest()
    first = Download(blob_store.sas_url("m.zip", via=blob_proxy), part, sha256=sha, **_fast())
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.bytes_done > 200_000, 10, "some bytes")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = part.stat().st_size
    assert kept >= 200_000 and sorted(os.listdir(tmp_path)) == [".m.zip.resume", "m.zip.part"]

    blob_proxy.throttle(None)
    second = Download(blob_store.sas_url("m.zip", via=blob_proxy, expires_in=7200), part, sha256=sha, **_fast())
    result = await second.run()
    assert result.path.read_bytes() == data and second.resumed_bytes == kept
    assert result.bytes_fetched == len(data) - kept  # only the rest crossed the network
    assert os.listdir(tmp_path) == ["m.zip.part"]  # the resume note is gone


async def test_resume_note_for_another_blob_is_not_used(tmp_path: Path, blob_store, blob_proxy) -> None:
    old, new = _package(MiB, seed=3), _package(MiB, seed=4)
    blob_store.upload("m.zip", old)
    blob_proxy.throttle(400_000)
    part = tmp_path / "m.zip.part"
    first = Download(blob_store.sas_url("m.zip", via=blob_proxy), part, **_fast())
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.bytes_done > 100_000, 10, "some bytes")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    blob_proxy.throttle(None)
    blob_store.upload("m.zip", new)  # same name, new bytes: the kept ETag no longer matches
    result = await Download(blob_store.sas_url("m.zip", via=blob_proxy), part, **_fast()).run()
    assert result.path.read_bytes() == new


async def test_cancel_before_any_byte_leaves_nothing(tmp_path: Path, blob_store, blob_proxy) -> None:
    blob_store.upload("m.zip", b"x" * 1000)
    blob_proxy.refuse()
    download = Download(blob_store.sas_url("m.zip", via=blob_proxy), tmp_path / "m.zip.part",
                        **_fast(retries=50, backoff_base=0.5))
    task = asyncio.create_task(download.run())
    await eventually(lambda: download.attempts >= 1, 5, "a first attempt")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(tmp_path) == []
