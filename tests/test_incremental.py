"""Fewer bytes over the link: a package made by ``edgeloader pack`` is fetched from Azurite piece by
piece, only what the device's stored versions do not hold, through a proxy that counts the requests."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from packages import SSD_LABELS, ssd_onnx, write_folder
from waiting import eventually

from supervisor.cli.pack import pack_main
from supervisor.package.chunking import ChunkParams, chunk_bytes
from supervisor.package.indexed import parse_index_record, parse_tail
from supervisor.package.reader import file_sha256
from supervisor.twin.gate import Gate, parse_window
from supervisor.twin.incremental import IncrementalDownload, coalesce

if TYPE_CHECKING:
    from rangeproxy import RangeProxy

pytest_plugins = ["iot_fixtures", "rangeproxy"]

MiB = 1 << 20


def detector(backbone_seed: int = 1, head_seed: int = 1, backbone_floats: int = 800_000,
             head_floats: int = 40_000) -> bytes:
    """The test SSD with weights of a realistic kind (float32, normal): a 'backbone' and a 'head'
    initializer, each from its own seed, so a test can retrain one and keep the other."""
    model = onnx.load_from_string(ssd_onnx())
    for name, seed, n in (("backbone", backbone_seed, backbone_floats), ("head", head_seed, head_floats)):
        weights = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(weights, name))
    return model.SerializeToString()


def pack(tmp: Path, name: str, version: str, model: bytes, labels: str = SSD_LABELS, *args: str) -> Path:
    folder = write_folder(tmp / f"src-{name}-{version}", {"model.onnx": model, "labels.txt": labels.encode()})
    out = tmp / f"{name}-{version}.zip"
    assert pack_main([str(folder), "-o", str(out), "--name", name, "--version", version, "--handler", "onnx_ssd",
                      "--score-threshold", "0.1", "--no-verify", *args]) == 0
    return out


def install(package: Path, where: Path) -> list[tuple[Path, str]]:
    """What a stored version looks like to the download: unpacked files and their SHA-256."""
    with zipfile.ZipFile(package) as zf:
        zf.extractall(where)
    return [(p, file_sha256(p)) for p in sorted(where.iterdir()) if p.stat().st_size >= 256 * 1024]


def fast(**overrides: Any) -> dict[str, Any]:
    return {"retries": 3, "backoff_base": 0.05, "backoff_max": 0.2, "read_timeout": 5.0, **overrides}


# ---------------------------------------------------------------------------------------- the format
def test_cuts_follow_the_content_not_the_offsets() -> None:
    data = np.random.default_rng(3).bytes(3 * MiB)
    params = ChunkParams()
    before = chunk_bytes(data, params)
    shifted = chunk_bytes(data[:100_000] + b"inserted" * 1000 + data[100_000:], params)
    assert chunk_bytes(data, params) == before  # deterministic
    assert all(params.min_size <= c.length <= params.max_size for c in before[:-1])
    kept = {c.digest for c in before} & {c.digest for c in shifted}
    assert len(kept) >= len(before) - 2  # only the chunk holding the insertion is new


def test_coalesce_merges_small_holes_and_bounds_the_requests() -> None:
    assert coalesce([(0, 10), (10 + 500, 2000), (10_000, 10_100)], 32) == [(0, 2000), (10_000, 10_100)]
    many = [(i * 10_000, i * 10_000 + 100) for i in range(100)]
    merged = coalesce(many, 8)
    assert len(merged) == 8 and merged[0][0] == 0 and merged[-1][1] == many[-1][1]


def test_a_packed_zip_is_a_plain_zip_with_its_index_last(tmp_path: Path) -> None:
    package = pack(tmp_path, "det", "1", detector())
    data = package.read_bytes()
    with zipfile.ZipFile(package) as zf:
        assert zf.namelist() == ["model.json", "labels.txt", "model.onnx", ".edgeloader-chunks.json"]
        assert zf.testzip() is None and zf.read("model.onnx") == detector()
    if shutil.which("unzip"):
        proc = subprocess.run(["unzip", "-t", str(package)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and "No errors detected" in proc.stdout
    layout = parse_tail(data[-16384:], len(data) - 16384, len(data))
    assert layout.record is not None
    index = parse_index_record(data[layout.record[0]:layout.record[1]], len(data))
    (member,) = index.members
    assert member.name == "model.onnx" and member.size == len(detector())
    assert sum(c.length for c in member.chunks) < 0.95 * member.size  # deflated, chunk by chunk
    assert pack_main([str(tmp_path / "src-det-1"), "-o", str(tmp_path / "plain.zip"), "--no-verify",
                      "--no-index"]) == 0
    with zipfile.ZipFile(tmp_path / "plain.zip") as zf:
        assert ".edgeloader-chunks.json" not in zf.namelist()


async def test_an_indexed_package_installs_through_the_drop_folder(tmp_path: Path, pipeline: Any) -> None:
    """The pipeline's unpacking is today's (zipfile): the index member is a dot-file it ignores."""
    package = pack(tmp_path, "det", "7", detector())
    version = await pipeline.process(package, source="inbox")
    assert version is not None and version.key == ("det", "7")
    assert (version.path / "model.onnx").read_bytes() == detector()
    assert pipeline.engine.active.info.version == "7"
    assert [p.name for p, _ in pipeline.stored_files()] == ["model.onnx"]


def test_pack_auto_compression_picks_lzma_only_when_nothing_would_be_reused(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    v1 = pack(tmp_path, "det", "1", detector())
    head = pack(tmp_path, "det", "2", detector(head_seed=2), SSD_LABELS, "--previous", str(v1))
    full = pack(tmp_path, "det", "3", detector(backbone_seed=9, head_seed=9), SSD_LABELS, "--previous", str(v1))
    printed = capsys.readouterr().out
    assert re.search(r"\b9\d% of the model is in det-1.zip: chunked", printed)
    assert "\n0% of the model is in det-1.zip: lzma" in printed
    with zipfile.ZipFile(head) as zf:
        assert zf.getinfo("model.onnx").compress_type == zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(full) as zf:  # zipfile, which every release unpacks with, reads method 14
        assert zf.getinfo("model.onnx").compress_type == zipfile.ZIP_LZMA
        assert zf.read("model.onnx") == detector(backbone_seed=9, head_seed=9)
        assert ".edgeloader-chunks.json" not in zf.namelist()
    assert full.stat().st_size < 0.93 * v1.stat().st_size  # ~0.85 of the model instead of ~0.93


async def test_an_lzma_package_installs_through_the_drop_folder(tmp_path: Path, pipeline: Any) -> None:
    package = pack(tmp_path, "det", "8", detector(), SSD_LABELS, "--compression", "lzma")
    version = await pipeline.process(package, source="inbox")
    assert version is not None and (version.path / "model.onnx").read_bytes() == detector()


# ------------------------------------------------------------------------------ against real Azurite
async def test_a_head_retrain_fetches_only_the_changed_chunks(tmp_path: Path, blob_store: Any,
                                                              range_proxy: RangeProxy) -> None:
    v1 = pack(tmp_path, "det", "1", detector(head_seed=1))
    v2 = pack(tmp_path, "det", "2", detector(head_seed=2))  # the head retrained, the backbone as it was
    seeds = install(v1, tmp_path / "models" / "det" / "1")
    blob_store.upload("det-2.zip", v2.read_bytes())
    url = range_proxy.url(blob_store.sas_url("det-2.zip"))
    data = v2.read_bytes()
    staging = tmp_path / "staging"
    staging.mkdir()
    download = IncrementalDownload(url, staging / "det-2.zip.part", seeds=lambda: seeds, expected_length=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(), **fast())
    result = await download.run()
    assert result.path.read_bytes() == data and result.sha256 == hashlib.sha256(data).hexdigest()
    assert download.mode == "incremental"
    fraction = download.bytes_fetched / len(data)
    print(f"head retrain: package {len(data)} B, fetched {download.bytes_fetched} B ({fraction:.1%}), "
          f"reused {download.bytes_reused} B, {len(range_proxy.requests)} requests")
    assert fraction < 0.15 and download.bytes_reused > 0.8 * len(data)
    # Every request was a Range request; all after the first (the tail, which gives the ETag) If-Match.
    assert range_proxy.requests and all(s.range and s.status == 206 for s in range_proxy.requests)
    assert all(s.if_match for s in range_proxy.requests[1:]) and len(range_proxy.requests) <= 1 + 1 + 32
    assert range_proxy.body_bytes == download.bytes_fetched  # what crossed the link
    assert sorted(p.name for p in staging.iterdir()) == [".chunk-cache", "det-2.zip.part"]

    # Re-packed under a new version with the same files (or a new threshold, new labels): the
    # manifest and the labels are all that is fetched, besides the tail.
    v3 = pack(tmp_path, "det", "3", detector(head_seed=2), "person\ncar\n")
    blob_store.upload("det-3.zip", v3.read_bytes())
    range_proxy.requests.clear()
    again = IncrementalDownload(range_proxy.url(blob_store.sas_url("det-3.zip")), staging / "det-3.zip.part",
                                seeds=lambda: install(v2, tmp_path / "models" / "det" / "2"),
                                expected_length=v3.stat().st_size, sha256=file_sha256(v3), **fast())
    await again.run()
    print(f"labels and version changed: fetched {again.bytes_fetched} B of {v3.stat().st_size} B")
    assert again.bytes_fetched <= 0.01 * v3.stat().st_size and len(range_proxy.requests) <= 3


async def test_a_device_whose_zlib_deflates_differently_fetches_those_chunks(
    tmp_path: Path, blob_store: Any, range_proxy: RangeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are re-deflated on the device; another zlib may give other bytes for the same chunk.
    Their digests then differ from the index's, and they are fetched: bytes, not correctness."""
    import supervisor.twin.incremental as incremental

    seeds = install(pack(tmp_path, "det", "1", detector()), tmp_path / "v1")
    v2 = pack(tmp_path, "det", "2", detector(head_seed=2))
    data = v2.read_bytes()
    blob_store.upload("det-2.zip", data)
    real = incremental.encode_chunk
    calls = {"n": 0}

    def other_zlib(raw: Any) -> bytes:  # every other chunk comes out different
        calls["n"] += 1
        return real(raw) + (b"\x00" if calls["n"] % 2 else b"")

    monkeypatch.setattr(incremental, "encode_chunk", other_zlib)
    download = IncrementalDownload(range_proxy.url(blob_store.sas_url("det-2.zip")), tmp_path / "d.zip.part",
                                   seeds=lambda: seeds, expected_length=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(), **fast())
    result = await download.run()
    assert result.path.read_bytes() == data and download.mode == "incremental"
    assert 0.3 * len(data) < download.bytes_reused < 0.7 * len(data)
    # At most 32 ranges: some reused chunks between them are fetched again rather than make more requests.
    assert download.bytes_fetched < 0.7 * len(data) and len(range_proxy.requests) <= 1 + 32


async def test_nothing_reusable_falls_back_to_the_whole_download(tmp_path: Path, blob_store: Any,
                                                                 range_proxy: RangeProxy) -> None:
    other = install(pack(tmp_path, "other", "1", detector(backbone_seed=7, head_seed=7)), tmp_path / "other")
    v2 = pack(tmp_path, "det", "2", detector(backbone_seed=8, head_seed=8))
    data = v2.read_bytes()
    blob_store.upload("det-2.zip", data)
    download = IncrementalDownload(range_proxy.url(blob_store.sas_url("det-2.zip")), tmp_path / "det-2.zip.part",
                                   seeds=lambda: other, expected_length=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(), **fast())
    result = await download.run()
    assert result.path.read_bytes() == data and download.mode == "whole"
    print(f"nothing reusable: fetched {download.bytes_fetched / len(data):.4f} of the package")
    assert len(data) <= download.bytes_fetched <= 1.05 * len(data)
    assert [bool(s.range) for s in range_proxy.requests] == [True, False]  # the tail, then the whole blob

    # A package packed for a whole download (LZMA, no index): the tail says so, then the whole blob.
    lzma_package = pack(tmp_path, "det", "3", detector(backbone_seed=1, head_seed=1), SSD_LABELS,
                        "--compression", "lzma")
    blob_store.upload("det-3.zip", lzma_package.read_bytes())
    range_proxy.requests.clear()
    whole = IncrementalDownload(range_proxy.url(blob_store.sas_url("det-3.zip")), tmp_path / "c.zip.part",
                                seeds=lambda: install(pack(tmp_path, "det", "1", detector()), tmp_path / "v1"),
                                expected_length=lzma_package.stat().st_size, sha256=file_sha256(lzma_package),
                                **fast())
    await whole.run()
    assert whole.mode == "whole" and whole.bytes_fetched <= 1.02 * lzma_package.stat().st_size

    # No stored version at all: straight to the whole download, not even the tail.
    range_proxy.requests.clear()
    plain = IncrementalDownload(range_proxy.url(blob_store.sas_url("det-2.zip")), tmp_path / "b.zip.part",
                                seeds=list, expected_length=len(data), sha256=result.sha256, **fast())
    await plain.run()
    assert plain.bytes_fetched == len(data) and len(range_proxy.requests) == 1


async def test_an_incremental_fetch_cut_half_way_resumes_where_it_stopped(tmp_path: Path, blob_store: Any,
                                                                          range_proxy: RangeProxy) -> None:
    seeds = install(pack(tmp_path, "det", "1", detector(backbone_seed=1, head_seed=1, head_floats=300_000)),
                    tmp_path / "v1")
    # Half the weights retrained: several hundred KB to fetch, in several ranges.
    v2 = pack(tmp_path, "det", "2", detector(backbone_seed=1, head_seed=2, head_floats=300_000))
    data = v2.read_bytes()
    blob_store.upload("det-2.zip", data)
    url = range_proxy.url(blob_store.sas_url("det-2.zip"))
    part = tmp_path / "det-2.zip.part"
    sha = hashlib.sha256(data).hexdigest()
    range_proxy.rate = 400_000
    first = IncrementalDownload(url, part, seeds=lambda: seeds, expected_length=len(data), sha256=sha,
                                **fast(chunk_size=16 * 1024))
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.ranges and first.bytes_done - (len(data) - first.bytes_needed) > 300_000, 20,
                     "part of the ranges")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert part.exists() and (tmp_path / ".det-2.zip.resume").exists()
    planned = first.bytes_needed
    range_proxy.rate = None
    second = IncrementalDownload(url, part, seeds=lambda: seeds, expected_length=len(data), sha256=sha, **fast())
    result = await second.run()
    assert result.path.read_bytes() == data and second.mode == "incremental"
    assert second.resumed_bytes > first.bytes_reused + 300_000
    print(f"resume: planned {planned} B, first run {first.bytes_fetched} B, second run {second.bytes_fetched} B")
    # The second run fetched only what the first had not (within one network read of slack).
    assert first.bytes_fetched + second.bytes_fetched <= planned + 64 * 1024
    assert not (tmp_path / ".det-2.zip.resume").exists()


async def test_outside_the_window_a_download_waits_and_the_rate_is_limited(tmp_path: Path, blob_store: Any,
                                                                         range_proxy: RangeProxy) -> None:
    from datetime import datetime

    data = np.random.default_rng(5).bytes(300_000)
    blob_store.upload("m.zip", data)
    now = {"t": datetime(2026, 1, 1, 12, 0)}
    gate = Gate(200_000, [parse_window("01:00-05:00")], clock=lambda: now["t"], check_seconds=0.05)
    pauses: list[object] = []
    gate.on_pause = pauses.append
    download = IncrementalDownload(range_proxy.url(blob_store.sas_url("m.zip")), tmp_path / "m.zip.part",
                                   seeds=list, expected_length=len(data), gate=gate, **fast())
    task = asyncio.create_task(download.run())
    await asyncio.sleep(0.3)
    assert not range_proxy.requests and gate.describe()["paused_until"] == "2026-01-02T01:00:00"
    assert pauses == [datetime(2026, 1, 2, 1, 0)]
    now["t"] = datetime(2026, 1, 2, 1, 0)  # the window opens
    started = asyncio.get_running_loop().time()
    result = await task
    elapsed = asyncio.get_running_loop().time() - started
    assert result.path.read_bytes() == data and pauses[-1] is None
    assert elapsed >= (len(data) - 200_000) / 200_000 * 0.8  # one second of burst, then 200 kB/s


# ------------------------------------------------------------------- the twin, with the real pipeline
def twin_service(iot_hub: Any, settings: Any, pipeline: Any, **changes: Any) -> Any:
    from supervisor.twin.service import TwinService

    return TwinService(
        settings.replace(twin="auto", connection_string=iot_hub.connection_string, **changes), pipeline,
        env=iot_hub.env, progress_interval=0.5, retry_interval=0.5, twin_timeout=5.0, pipeline_timeout=30.0,
        download_retries=3, download_backoff=(0.1, 0.5), download_read_timeout=5.0, connection_retry_interval=1,
    )


async def test_outside_its_window_a_twin_update_waits_and_says_until_when(
    iot_hub: Any, blob_store: Any, tmp_path: Path, settings: Any, pipeline: Any, start_watcher: Any,
    range_proxy: RangeProxy,
) -> None:
    from datetime import datetime

    from supervisor.cli.twinpatch import desired_properties

    await start_watcher(pipeline)
    service = twin_service(iot_hub, settings, pipeline, download_windows=["01:00-05:00"],
                           download_rate_limit=10_000_000)
    now = {"t": datetime(2026, 1, 1, 12, 0)}
    service.gate.clock = lambda: now["t"]
    service.gate.check_seconds = 0.1
    task = asyncio.create_task(service.run())
    sim = iot_hub.sim
    try:
        await eventually(lambda: sim.twin_gets >= 2 or task.done(), 15, "the module to read its twin")
        assert sim.reported_copy()["DownloadPolicy"] == {"RateLimit": 10_000_000, "Windows": ["01:00-05:00"]}
        package = pack(tmp_path, "det", "1", detector())
        blob_store.upload(package.name, package.read_bytes())
        version = sim.set_desired(desired_properties(package, range_proxy.url(blob_store.sas_url(package.name))))
        status = await eventually(lambda: sim.status().get("PausedUntil") and sim.status(), 15, "a paused report")
        assert status["State"] == "downloading" and status["PausedUntil"] == "2026-01-02T01:00:00"
        assert service.status.public()["download"]["paused_until"] == "2026-01-02T01:00:00"  # /models
        assert range_proxy.requests == []
        now["t"] = datetime(2026, 1, 2, 1, 0)
        status = await sim.wait_status("active", version, within=30)
        assert "PausedUntil" not in status
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=15)


async def test_a_twin_update_fetches_only_the_changed_part(iot_hub: Any, blob_store: Any, tmp_path: Path,
                                                           settings: Any, pipeline: Any, start_watcher: Any,
                                                           range_proxy: RangeProxy) -> None:
    from supervisor.cli.twinpatch import desired_properties

    await start_watcher(pipeline)
    service = twin_service(iot_hub, settings, pipeline)
    task = asyncio.create_task(service.run())
    sim = iot_hub.sim
    try:
        await eventually(lambda: sim.twin_gets >= 2 or task.done(), 15, "the module to read its twin")
        for seed in (1, 2):  # v1 arrives whole (nothing stored to reuse), v2 retrains the head
            package = pack(tmp_path, "det", str(seed), detector(head_seed=seed))
            blob_store.upload(package.name, package.read_bytes())
            range_proxy.requests.clear()
            version = sim.set_desired(desired_properties(package, range_proxy.url(blob_store.sas_url(package.name))))
            status = await sim.wait_status("active", version, within=30)
            assert status["ActiveModel"]["Version"] == str(seed)
            if seed == 1:  # only the bundled model is stored (too small to chunk): one plain GET, no tail
                assert service.last_download is not None and service.last_download.mode == "whole"
                assert [s.range for s in range_proxy.requests] == [None]
                assert status["BytesReused"] == 0 and status["BytesFetched"] == package.stat().st_size
        size = package.stat().st_size
        print(f"twin: v2 {size} B; reported {status}; {len(range_proxy.requests)} requests")
        assert status["BytesReused"] > 0.8 * size and status["BytesFetched"] < 0.15 * size
        assert status["BytesNeeded"] >= status["BytesFetched"] and "PausedUntil" not in status
        assert range_proxy.requests and all(s.range for s in range_proxy.requests)
        assert range_proxy.body_bytes == status["BytesFetched"]
        assert sim.reported_copy()["DownloadPolicy"] == {"RateLimit": 0, "Windows": []}
        downloaded = [e for e in pipeline.events.history if e.state == "downloaded"][-1]  # what /models lists
        assert downloaded.bytes_reused == status["BytesReused"] and downloaded.bytes_fetched == status["BytesFetched"]
        assert service.status.public()["download"] == {"rate_limit": 0, "windows": [], "paused_until": None}
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=15)
