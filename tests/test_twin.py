"""Remote model updates through the module twin, with the real parts.

The real azure-iot-device SDK talks MQTT over TLS to a real mosquitto (through a fault proxy that can
take the "hub" away); a hub simulator plays IoT Hub's side of the twin; packages come from Azurite with
real SAS URLs. ``ScriptedPipeline`` plays the update pipeline for the twin-specific cases (it watches
staging like the real one and publishes the same events); the tests at the end run the real pipeline
and the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from waiting import eventually

from supervisor.cli.twinpatch import desired_properties
from supervisor.settings import Settings
from supervisor.twin.service import DesiredModel, TwinService
from supervisor.updates.events import EventBus, ModelEvent

if TYPE_CHECKING:
    from iot_fixtures import BlobStore, FaultProxy, IotHub

pytest_plugins = ["iot_fixtures"]

KiB = 1024




def package_bytes(size: int, seed: str = "a", bad: bool = False) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 512
    data = (block * (size // len(block) + 1))[:size]
    return b"BAD" + data[3:] if bad else data


class ScriptedPipeline:
    """Plays the update pipeline: watches staging/, honours the intent sidecar, publishes events.

    A package whose bytes start with ``BAD`` fails validation (rejected, as the real pipeline does
    with a package it cannot read).
    """

    def __init__(self, data_dir: Path) -> None:
        self.events = EventBus()
        self.data_dir = data_dir
        self.staging_dir = data_dir / "staging"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.installed: dict[str, tuple[str, str]] = {}
        self.received: list[str] = []
        self.activations: list[tuple[str, str, str]] = []
        self.activation_seconds = 0.0  # how long loading and warming up a model takes
        self.refuse_activation: set[tuple[str, str]] = set()  # (name, version) that fail to activate
        self._active: ModelEvent | None = None
        self._packages: dict[tuple[str, str], tuple[str, str]] = {}

    def find_package(self, sha256: str) -> tuple[str, str] | None:
        return self.installed.get(sha256)

    def stored_files(self) -> list[tuple[Path, str]]:
        return []  # packages here are bytes, not unpacked files: every download is whole

    def active(self) -> ModelEvent | None:
        return self._active

    async def activate(self, name: str, version: str, source: str) -> None:
        package, sha = self._packages[(name, version)]
        if (name, version) in self.refuse_activation:
            raise RuntimeError(f"{name} {version} fails its warm-up")
        self.activations.append((name, version, source))
        self.events.publish(ModelEvent("activating", source, package, name, version, sha))
        await asyncio.sleep(self.activation_seconds)
        self._active = ModelEvent(
            "active", source, package, name, version, sha,
            model_sha256=hashlib.sha256(f"{name}{version}".encode()).hexdigest(),
            model_path=f"models/{name}/{version}/model.tflite",
            labels_path=f"models/{name}/{version}/labels.txt",
        )
        self.events.publish(self._active)

    def install(self, package: str, data: bytes, name: str, version: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.installed[sha] = (name, version)
        self._packages[(name, version)] = (package, sha)
        return sha

    async def run(self) -> None:
        while True:
            for entry in sorted(os.listdir(self.staging_dir)):
                if entry.startswith(".") or entry.endswith((".part", ".intent.json")):
                    continue  # as the real watcher: temp files, sidecars and dot-names are not packages
                path = self.staging_dir / entry
                if path.is_dir():
                    continue  # not a download (the real watcher would take it for a folder package)
                intent_path = self.staging_dir / f"{entry}.intent.json"
                intent = json.loads(intent_path.read_text()) if intent_path.exists() else {}
                data = path.read_bytes()
                path.unlink()
                intent_path.unlink(missing_ok=True)
                await self._process(entry, data, intent)
            await asyncio.sleep(0.02)

    async def _process(self, package: str, data: bytes, intent: dict[str, Any]) -> None:
        sha = hashlib.sha256(data).hexdigest()
        source = intent.get("source", "staging")
        assert intent.get("sha256") in (None, sha), "intent sidecar names other bytes"
        self.received.append(package)
        self.events.publish(ModelEvent("received", source, package, sha256=sha))
        self.events.publish(ModelEvent("validating", source, package, sha256=sha))
        if data.startswith(b"BAD"):
            self.events.publish(ModelEvent("rejected", source, package, sha256=sha,
                                           reason="no model file (.onnx or .tflite) in the package"))
            return
        if sha in self.installed:
            self.events.publish(ModelEvent("duplicate", source, package, sha256=sha))
            return
        name = intent.get("name") or package.split("-")[0]
        version = intent.get("version") or package.rsplit("-", 1)[-1].removesuffix(".zip")
        self.install(package, data, name, version)
        if intent.get("activate", True):
            await self.activate(name, version, source)
        else:
            self.events.publish(ModelEvent("stored", source, package, name, version, sha))


class Rig:
    """A running TwinService against the hub simulator, with the scripted pipeline or a real one."""

    def __init__(self, hub: IotHub, blobs: BlobStore, scratch: Path, updates: Any = None,
                 settings: Settings | None = None, **options: Any) -> None:
        self.hub, self.sim, self.blobs, self.scratch = hub, hub.sim, blobs, scratch
        self.pipeline = updates if updates is not None else ScriptedPipeline(scratch / "data")
        settings = (settings or Settings(data_dir=self.pipeline.data_dir)).replace(
            twin="auto", connection_string=hub.connection_string
        )
        defaults: dict[str, Any] = {
            "progress_interval": 0.5, "retry_interval": 0.5, "twin_timeout": 5.0, "pipeline_timeout": 15.0,
            "download_retries": 3, "download_backoff": (0.1, 0.5), "download_read_timeout": 5.0,
            "connection_retry_interval": 1,
        }
        env = options.pop("env", hub.env)
        self.service = TwinService(settings, self.pipeline, env=env, **(defaults | options))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Rig:
        self._tasks = [asyncio.create_task(self.service.run(), name="twin")]
        if isinstance(self.pipeline, ScriptedPipeline):
            self._tasks.append(asyncio.create_task(self.pipeline.run(), name="scripted-pipeline"))
        # Connected, first twin read, desired-patch handler subscribed.
        await eventually(lambda: self.sim.twin_gets >= 2 or any(t.done() for t in self._tasks), 15,
                         "the module to connect and read its twin")
        for task in self._tasks:
            if task.done():
                task.result()
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=15)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def restart_service(self) -> None:
        """Cancel ``service.run()`` and run it again, as the supervisor does after a crash."""
        twin = self._tasks[0]
        twin.cancel()
        await asyncio.wait([twin], timeout=15)
        gets = self.sim.twin_gets
        self._tasks[0] = asyncio.create_task(self.service.run(), name="twin")
        await eventually(lambda: self.sim.twin_gets >= gets + 2 or self._tasks[0].done(), 15,
                         "the restarted service to connect and read its twin")
        if self._tasks[0].done():
            self._tasks[0].result()

    def desired_for(self, blob: str, data: bytes, via: FaultProxy | None = None, **kw: Any) -> dict[str, Any]:
        """Upload ``data`` as ``blob`` and return what ``edgeloader twin-patch`` prints for it."""
        self.blobs.upload(blob, data)
        tmp = self.scratch / blob
        tmp.write_bytes(data)
        try:
            return desired_properties(tmp, self.blobs.sas_url(blob, via=via), **kw)
        finally:
            tmp.unlink()


@pytest.fixture
async def rig(iot_hub: IotHub, blob_store: BlobStore, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(iot_hub, blob_store, tmp_path)
    await rig.start()
    try:
        yield rig
    finally:
        await rig.stop()


# ----------------------------------------------------------------------------------------- tests
async def test_happy_path_reports_active_and_sends_output(rig: Rig) -> None:
    data = package_bytes(600 * KiB)
    desired = rig.desired_for("ssd-1.2.zip", data, name="ssd", version="1.2")
    started = time.monotonic()
    version = rig.sim.set_desired(desired)
    status = await rig.sim.wait_status("active", version)
    elapsed = time.monotonic() - started
    print(f"desired patch -> active on loopback: {elapsed * 1000:.0f} ms")

    reported = rig.sim.reported_copy()
    assert reported["LatestAIModelFileName"] == "ssd-1.2.zip"
    assert status["FileName"] == "ssd-1.2.zip" and status["BytesDone"] == status["BytesTotal"] == len(data)
    assert "Reason" not in status and status["Timestamp"].endswith("Z")
    assert status["ActiveModel"]["Name"] == "ssd" and status["ActiveModel"]["Version"] == "1.2"
    assert len(status["ActiveModel"]["SHA256"]) == 64
    # Reports are coalesced (only the latest status matters), so steps may be skipped, never reordered.
    order = ["downloading", "verifying", "activating", "active"]
    states = rig.sim.states()
    assert states[0] == "downloading" and states[-1] == "active"
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)

    messages = await eventually(lambda: rig.sim.outputs("DLModelOutput"), 10, "a DLModelOutput message")
    body = messages[-1].body
    assert body["local_model_path"] == "models/ssd/1.2/model.tflite"
    assert body["local_labelmap_path"] == "models/ssd/1.2/labels.txt"
    assert (body["model_name"], body["model_version"]) == ("ssd", "1.2")
    assert rig.pipeline.received == ["ssd-1.2.zip"]
    assert sorted(os.listdir(rig.pipeline.staging_dir)) == []  # nothing left behind
    assert "sig=" not in json.dumps(reported)


async def test_offline_while_desired_changes_catches_up_on_reconnect(rig: Rig) -> None:
    first = rig.sim.set_desired(rig.desired_for("m-1.zip", package_bytes(100 * KiB, "1")))
    await rig.sim.wait_status("active", first)
    rig.hub.proxy.offline()  # the hub is unreachable; IoT Hub keeps no patch for an offline module
    await eventually(lambda: not rig.service.hub or not rig.service.hub.connected, 10, "the disconnect")
    second = rig.sim.set_desired(rig.desired_for("m-2.zip", package_bytes(100 * KiB, "2")))
    await asyncio.sleep(1.5)  # the module misses the patch notification for good
    assert rig.pipeline.received == ["m-1.zip"]
    rig.hub.proxy.online()
    status = await rig.sim.wait_status("active", second, within=20)
    assert status["FileName"] == "m-2.zip"
    assert rig.sim.reported_copy()["LatestAIModelFileName"] == "m-2.zip"
    assert rig.pipeline.received == ["m-1.zip", "m-2.zip"]


async def test_download_cut_at_half_resumes(rig: Rig, blob_proxy: FaultProxy) -> None:
    data = package_bytes(3 * 1024 * KiB)
    desired = rig.desired_for("big-1.zip", data, via=blob_proxy)
    blob_proxy.cut_after(len(data) // 2)
    version = rig.sim.set_desired(desired)
    await rig.sim.wait_status("active", version, within=20)
    download = rig.service.last_download
    assert download is not None and download.attempts == 2
    chunk = download.chunk_size
    assert len(data) <= download.bytes_fetched <= len(data) + chunk
    assert blob_proxy.bytes_down <= len(data) + chunk  # what crossed the wire, headers included
    print(f"twin resume: package {len(data)} B, fetched {download.bytes_fetched} B, "
          f"on the wire {blob_proxy.bytes_down} B")


async def test_restart_mid_download_resumes_from_the_kept_part(iot_hub: IotHub, blob_store: BlobStore,
                                                                tmp_path: Path, blob_proxy: FaultProxy) -> None:
    data = package_bytes(1024 * KiB, "restart")
    first = await Rig(iot_hub, blob_store, tmp_path).start()
    blob_proxy.throttle(512 * KiB)
    version = iot_hub.sim.set_desired(first.desired_for("r-1.zip", data, via=blob_proxy))
    await eventually(lambda: first.service.last_download and first.service.last_download.bytes_done > 256 * KiB,
                     10, "part of the download")
    await first.stop()  # the module restarts (image update, power cycle of the service)
    kept = (first.pipeline.staging_dir / "r-1.zip.part").stat().st_size
    blob_proxy.throttle(None)
    second = await Rig(iot_hub, blob_store, tmp_path).start()
    try:
        await iot_hub.sim.wait_status("active", version)
        download = second.service.last_download
        assert download is not None and download.resumed_bytes == kept > 0
        assert download.bytes_fetched == len(data) - kept
    finally:
        await second.stop()


async def test_failures_are_reported_once_and_not_retried(rig: Rig, blob_proxy: FaultProxy,
                                                          iot_hub: IotHub, tmp_path: Path) -> None:
    blobs = rig.blobs
    good = package_bytes(50 * KiB, "good")
    cases: list[tuple[dict[str, Any], str]] = []
    wrong = rig.desired_for("wrong-1.zip", good, via=blob_proxy)
    wrong["ContentSHA256"] = hashlib.sha256(b"something else").hexdigest()
    wrong.pop("ContentMD5")
    cases.append((wrong, "SHA-256 mismatch"))
    expired = rig.desired_for("expired-1.zip", good, via=blob_proxy)
    expired["DownloadUrl"] = blobs.sas_url("expired-1.zip", expires_in=-60, via=blob_proxy)
    cases.append((expired, "SAS token is expired or invalid"))
    missing = rig.desired_for("missing-1.zip", good, via=blob_proxy)
    missing["DownloadUrl"] = blobs.sas_url("never-uploaded.zip", via=blob_proxy)
    cases.append((missing, "not found (HTTP 404)"))
    cases.append((rig.desired_for("broken-1.zip", package_bytes(40 * KiB, bad=True), via=blob_proxy),
                  "no model file"))
    cases.append(({"FileName": "x-1.zip", "DownloadUrl": "http://127.0.0.1:9/x-1.zip", "ContentSHA256": None,
                   "ContentMD5": None}, "ContentSHA256 or ContentMD5 is required"))

    for desired, reason in cases:
        before = blob_proxy.connections
        version = rig.sim.set_desired(desired)
        status = await rig.sim.wait_status("failed", version)
        assert reason in status["Reason"], status
        assert "sig=" not in status["Reason"]
        assert blob_proxy.connections - before <= 1  # one request, no retry loop
    connections = blob_proxy.connections
    await asyncio.sleep(1.0)
    assert blob_proxy.connections == connections, "a failed update is being retried"
    assert rig.pipeline.received == ["broken-1.zip"]
    assert "sig=" not in json.dumps(rig.sim.reported_copy())
    # /models (the event history) says why, beside the pipeline's own refusals.
    shown = {e.package: e.reason or "" for e in rig.pipeline.events.history
             if e.state in ("download_failed", "rejected")}
    assert set(shown) == {"wrong-1.zip", "expired-1.zip", "missing-1.zip", "broken-1.zip"}, shown
    assert "SHA-256 mismatch" in shown["wrong-1.zip"] and "not found (HTTP 404)" in shown["missing-1.zip"]
    assert "sig=" not in json.dumps([e.to_dict() for e in rig.pipeline.events.history])

    # A restart (the supervisor restarts a crashed service) does not retry the failed version either.
    await rig.stop()
    again = Rig(iot_hub, blobs, tmp_path / "restart")
    await again.start()
    try:
        await asyncio.sleep(1.0)
        assert blob_proxy.connections == connections
        assert rig.sim.status()["State"] == "failed"
    finally:
        await again.stop()


async def test_duplicate_desired_downloads_nothing(rig: Rig, blob_proxy: FaultProxy) -> None:
    data = package_bytes(200 * KiB, "dup")
    desired = rig.desired_for("dup-1.zip", data, via=blob_proxy, name="dup", version="1")
    first = rig.sim.set_desired(desired)
    await rig.sim.wait_status("active", first)
    connections = blob_proxy.connections
    # Same package, fresh SAS (a new $version): already here, already active -> nothing to fetch.
    again = dict(desired, DownloadUrl=rig.blobs.sas_url("dup-1.zip", via=blob_proxy, expires_in=7200))
    second = rig.sim.set_desired(again)
    await rig.sim.wait_status("active", second)
    assert blob_proxy.connections == connections
    assert rig.pipeline.received == ["dup-1.zip"] and len(rig.pipeline.activations) == 1

    # Installed but not active: activated from the repository, still without a download.
    other = package_bytes(10 * KiB, "other")
    rig.pipeline.install("other-1.zip", other, "other", "1")
    await rig.pipeline.activate("other", "1", "api")
    await eventually(lambda: rig.sim.reported_copy().get("LatestAIModelFileName") == "other-1.zip", 10,
                     "the API activation to be reported")
    third = rig.sim.set_desired({"Activate": True, "ContentLength": len(data)})  # any newer version
    await rig.sim.wait_status("active", third)
    assert rig.pipeline.activations[-1] == ("dup", "1", "twin")
    assert rig.sim.reported_copy()["LatestAIModelFileName"] == "dup-1.zip"
    assert blob_proxy.connections == connections


async def test_a_desired_patch_not_newer_than_the_applied_one_is_ignored(rig: Rig, blob_proxy: FaultProxy) -> None:
    """A notification whose $version is older than, or equal to, the one applied (late, or repeated over
    a reconnect) is ignored: no download, no report, not even a read of the twin."""
    version = rig.sim.set_desired(rig.desired_for("m-1.zip", package_bytes(100 * KiB, "1"), via=blob_proxy))
    await rig.sim.wait_status("active", version)
    other = rig.desired_for("m-2.zip", package_bytes(100 * KiB, "2"), via=blob_proxy)
    gets, reports, connections = rig.sim.twin_gets, len(rig.sim.reported_patches), blob_proxy.connections
    for stale in (version - 1, version):
        rig.sim.notify_desired(other, stale)
    await asyncio.sleep(1.0)  # two of the module's retry intervals: an answer would be out by now
    assert rig.sim.twin_gets == gets, "a stale notification made the module read its twin"
    assert len(rig.sim.reported_patches) == reports and blob_proxy.connections == connections
    assert rig.pipeline.received == ["m-1.zip"]
    newer = rig.sim.set_desired(other)  # the same properties as a newer version: taken
    status = await rig.sim.wait_status("active", newer)
    assert status["FileName"] == "m-2.zip"


async def test_a_twin_read_not_newer_than_the_applied_one_changes_nothing(rig: Rig, blob_proxy: FaultProxy) -> None:
    """After a reconnect the module reads its twin again; the same $version it applied is no new request.
    An MD5-only request shows it best: applied again, it would be downloaded again (only the bytes tell
    whether that package is installed), and its status reported again."""
    desired = rig.desired_for("md5-1.zip", package_bytes(100 * KiB, "md5"), via=blob_proxy)
    del desired["ContentSHA256"]
    version = rig.sim.set_desired(desired)
    await rig.sim.wait_status("active", version)
    gets, reports, connections = rig.sim.twin_gets, len(rig.sim.reported_patches), blob_proxy.connections
    rig.hub.proxy.offline()
    await eventually(lambda: rig.service.hub is not None and not rig.service.hub.connected, 10, "the disconnect")
    rig.hub.proxy.online()
    await eventually(lambda: rig.sim.twin_gets > gets, 20, "the twin read after the reconnect")
    await asyncio.sleep(1.0)  # a download and a report would have started by now
    assert blob_proxy.connections == connections, "the package was downloaded again"
    again = [p for _, p in rig.sim.reported_patches[reports:] if "ModelUpdate" in p]
    assert again == [], f"the applied version was reported again: {again}"
    assert rig.pipeline.received == ["md5-1.zip"] and rig.sim.status()["DesiredVersion"] == version


async def test_an_md5_only_request_for_an_installed_package_activates_it_without_a_hand_over(
    rig: Rig, blob_proxy: FaultProxy,
) -> None:
    """Without a SHA-256 only the downloaded bytes tell that the package is installed already: it is
    activated from the repository, and the download is not handed to the pipeline as a new package."""
    data = package_bytes(50 * KiB, "installed")
    rig.pipeline.install("inst-3.zip", data, "inst", "3")
    desired = rig.desired_for("inst-3.zip", data, via=blob_proxy)
    del desired["ContentSHA256"]
    version = rig.sim.set_desired(desired)
    status = await rig.sim.wait_status("active", version)
    assert status["ActiveModel"]["Name"] == "inst" and blob_proxy.connections == 1
    assert rig.pipeline.received == [] and rig.pipeline.activations == [("inst", "3", "twin")]
    assert os.listdir(rig.pipeline.staging_dir) == []  # the download is not left behind


async def test_an_installed_package_that_fails_to_activate_is_reported(rig: Rig) -> None:
    data = package_bytes(20 * KiB, "broken")
    rig.pipeline.install("brk-1.zip", data, "brk", "1")
    rig.pipeline.refuse_activation.add(("brk", "1"))
    version = rig.sim.set_desired(rig.desired_for("brk-1.zip", data))
    status = await rig.sim.wait_status("failed", version)
    assert status["Reason"] == "activation failed: brk 1 fails its warm-up"


async def test_a_pipeline_that_never_answers_is_reported(iot_hub: IotHub, blob_store: BlobStore,
                                                         tmp_path: Path) -> None:
    class Silent(ScriptedPipeline):
        async def run(self) -> None:  # takes nothing from staging, publishes nothing
            await asyncio.Future()

    rig = Rig(iot_hub, blob_store, tmp_path, updates=Silent(tmp_path / "data"), pipeline_timeout=1.0)
    await rig.start()
    try:
        version = rig.sim.set_desired(rig.desired_for("quiet-1.zip", package_bytes(10 * KiB, "quiet")))
        status = await rig.sim.wait_status("failed", version)
        assert status["Reason"] == "the update pipeline did not answer in time"
    finally:
        await rig.stop()


async def test_a_job_that_cannot_hand_its_download_over_is_reported(rig: Rig) -> None:
    """Something in staging/ under the package's name (a folder someone left there): the verified
    download cannot be renamed into place; the update fails with the reason, no secret in it."""
    (rig.pipeline.staging_dir / "blocked-1.zip").mkdir()
    version = rig.sim.set_desired(rig.desired_for("blocked-1.zip", package_bytes(10 * KiB, "blocked")))
    status = await rig.sim.wait_status("failed", version)
    assert status["Reason"].startswith("IsADirectoryError") and "sig=" not in status["Reason"]
    assert rig.pipeline.received == []


async def test_newer_desired_supersedes_a_running_download(rig: Rig, blob_proxy: FaultProxy) -> None:
    slow = package_bytes(2 * 1024 * KiB, "slow")
    blob_proxy.throttle(256 * KiB)  # about 8 s for the whole package
    first = rig.sim.set_desired(rig.desired_for("slow-1.zip", slow, via=blob_proxy))
    await eventually(lambda: rig.sim.status().get("BytesDone", 0) > 0, 10, "download progress")
    fast = package_bytes(64 * KiB, "fast")
    second = rig.sim.set_desired(rig.desired_for("fast-2.zip", fast))  # straight to Azurite
    status = await rig.sim.wait_status("active", second)
    assert status["FileName"] == "fast-2.zip"
    assert rig.pipeline.received == ["fast-2.zip"]
    staged = os.listdir(rig.pipeline.staging_dir)
    assert not any("slow-1.zip" in name for name in staged), staged  # its .part and resume note too
    assert first < second and rig.service.last_download is not None
    assert rig.service.last_download.url.startswith(rig.blobs.azurite.endpoint)  # the slow one was dropped
    # Progress is throttled: at most one 'downloading' report per progress_interval (0.5 s).
    downloading = [p for p in rig.sim.states() if p == "downloading"]
    assert 1 <= len(downloading) <= 2 + 2 * 3  # the first report plus at most 2/s for ~3 s
    # /models (the event history) shows the twin's steps among the pipeline's, and a download's progress
    # as one entry, the latest, whatever its length.
    history = rig.pipeline.events.history
    slow_steps = [e for e in history if e.package == "slow-1.zip"]
    assert [e.state for e in slow_steps] == ["downloading"]
    assert slow_steps[0].desired_version == first and slow_steps[0].bytes_total == len(slow)
    assert 0 < (slow_steps[0].bytes_done or 0) < len(slow)
    assert [e.state for e in history if e.package == "fast-2.zip"] == [
        "downloading", "downloaded", "received", "validating", "activating", "active"]


async def test_fresh_sas_during_a_download_resumes_it(rig: Rig, blob_proxy: FaultProxy) -> None:
    data = package_bytes(1024 * KiB, "sas")
    blob_proxy.throttle(512 * KiB)
    desired = rig.desired_for("sas-1.zip", data, via=blob_proxy)
    rig.sim.set_desired(desired)
    await eventually(lambda: rig.service.last_download and rig.service.last_download.bytes_done > 256 * KiB,
                     10, "part of the download")
    first = rig.service.last_download
    blob_proxy.throttle(None)
    fresh = rig.blobs.sas_url("sas-1.zip", via=blob_proxy, expires_in=7200)
    version = rig.sim.set_desired({"DownloadUrl": fresh})
    await rig.sim.wait_status("active", version)
    second = rig.service.last_download
    assert second is not first and second is not None and second.resumed_bytes > 0
    assert first is not None and first.bytes_fetched + second.bytes_fetched <= len(data) + 64 * KiB


async def test_reported_update_made_offline_arrives_after_reconnect(rig: Rig) -> None:
    rig.pipeline.install("drop-7.zip", b"dropped", "drop", "7")
    rig.hub.proxy.offline()
    await eventually(lambda: rig.service.hub is not None and not rig.service.hub.connected, 10,
                     "the disconnect")
    await rig.pipeline.activate("drop", "7", "inbox")  # e.g. a USB drop while the uplink is down
    await asyncio.sleep(1.0)
    assert rig.sim.reported_copy().get("LatestAIModelFileName") != "drop-7.zip"
    assert rig.sim.outputs("DLModelOutput") == []
    assert rig.service.reporter is not None and rig.service.reporter.pending
    rig.hub.proxy.online()
    await eventually(lambda: rig.sim.reported_copy().get("LatestAIModelFileName") == "drop-7.zip", 20,
                     "the reported update after reconnect")
    messages = await eventually(lambda: rig.sim.outputs("DLModelOutput"), 10, "the DLModelOutput message")
    assert messages[0].body["model_version"] == "7"
    assert rig.sim.reported_copy()["ModelUpdate"]["ActiveModel"]["Version"] == "7"


def announced(sim: Any) -> list[tuple[str, str]]:
    return [(m.body["model_name"], m.body["model_version"]) for m in sim.outputs("DLModelOutput")]


async def test_start_announces_the_active_model_once(iot_hub: IotHub, blob_store: BlobStore,
                                                     tmp_path: Path) -> None:
    """A module routed after ours, or a hub that lost the last activation's message, learns the active
    model from one DLModelOutput after the first connect; neither a reconnect nor a restart of the
    service in the same process repeats it."""
    rig = Rig(iot_hub, blob_store, tmp_path)
    rig.pipeline.install("ssd-4.zip", b"installed by an earlier run", "ssd", "4")
    await rig.pipeline.activate("ssd", "4", "startup")  # active before the twin service starts
    await rig.start()
    try:
        messages = await eventually(lambda: rig.sim.outputs("DLModelOutput"), 10, "the start-up DLModelOutput")
        assert messages[0].body["local_model_path"] == "models/ssd/4/model.tflite"
        assert announced(rig.sim) == [("ssd", "4")]
        # Acknowledged before the cut: the SDK publishes with QoS 1 and sends an unacknowledged message
        # again after a reconnect (at-least-once, as IoT Hub itself), which is not what this test is about.
        reporter = rig.service.reporter
        await eventually(lambda: reporter is not None and reporter.sent_messages == 1, 10, "the hub's ack")

        gets = rig.sim.twin_gets
        rig.hub.proxy.offline()
        await eventually(lambda: rig.service.hub is not None and not rig.service.hub.connected, 10,
                         "the disconnect")
        rig.hub.proxy.online()
        await eventually(lambda: rig.sim.twin_gets > gets, 20, "the twin read after the reconnect")
        await rig.restart_service()
        await asyncio.sleep(1.0)  # two reporter retry intervals: anything queued would be out by now
        assert announced(rig.sim) == [("ssd", "4")]
    finally:
        await rig.stop()


async def test_start_announces_only_the_model_the_twin_makes_active(iot_hub: IotHub, blob_store: BlobStore,
                                                                    tmp_path: Path) -> None:
    """The desired package, installed but not active, was set while the module was down. The start-up
    announcement waits until reconciliation has activated it, and does not repeat the activation's
    own message: one DLModelOutput, naming the new model, none for the one it replaced."""
    rig = Rig(iot_hub, blob_store, tmp_path)
    rig.pipeline.install("old-1.zip", b"old", "old", "1")
    await rig.pipeline.activate("old", "1", "startup")
    data = package_bytes(20 * KiB, "new")
    rig.pipeline.install("new-2.zip", data, "new", "2")
    rig.pipeline.activation_seconds = 0.5  # long enough for an early announcement to reach the hub
    version = rig.sim.set_desired(rig.desired_for("new-2.zip", data))
    await rig.start()
    try:
        await rig.sim.wait_status("active", version)
        await eventually(lambda: rig.sim.outputs("DLModelOutput"), 10, "a DLModelOutput")
        await asyncio.sleep(1.0)
        assert announced(rig.sim) == [("new", "2")]
        assert rig.pipeline.activations[-1] == ("new", "2", "twin") and rig.pipeline.received == []
    finally:
        await rig.stop()


async def test_iot_edge_environment_connects_through_the_gateway(
    iot_hub: IotHub, blob_store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On IoT Edge the module connects through edgeHub (create_from_edge_environment). The SDK's
    simulator form of that environment: EdgeHubConnectionString + EdgeModuleCACertificateFile."""
    edge = {
        "EdgeHubConnectionString": f"HostName={iot_hub.ip};DeviceId=dev1;ModuleId=loader;"
        f"SharedAccessKey=dGVzdGtleXRlc3RrZXl0ZXN0a2V5dGVzdGtleQ==;GatewayHostName={iot_hub.ip}",
        "EdgeModuleCACertificateFile": str(iot_hub.ca_file),
    }
    for key, value in edge.items():
        monkeypatch.setenv(key, value)
    rig = Rig(iot_hub, blob_store, tmp_path, settings=Settings(data_dir=tmp_path / "data"), env=edge)
    rig.service.settings = rig.service.settings.replace(connection_string=None)
    await rig.start()
    try:
        version = rig.sim.set_desired(rig.desired_for("edge-1.zip", package_bytes(20 * KiB, "edge")))
        await rig.sim.wait_status("active", version)
    finally:
        await rig.stop()


async def test_standalone_mode_runs_without_a_hub(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(tmp_path)
    service = TwinService(Settings(data_dir=tmp_path), pipeline, env={})
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0.1)
    assert not task.done() and service.hub is None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_twin_patch_cli_prints_the_desired_properties(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    from supervisor.cli.twinpatch import main

    package = tmp_path / "ssd-3.zip"
    package.write_bytes(b"package bytes" * 1000)
    url = "https://acct.blob.core.windows.net/models/ssd-3.zip?sv=1&sp=r&sig=SECRET"
    assert main([str(package), "--url", url, "--name", "ssd", "--version", "3"]) == 0
    out, err = capsys.readouterr()
    desired = json.loads(out)
    data = package.read_bytes()
    assert desired == {
        "FileName": "ssd-3.zip", "DownloadUrl": url, "ContentSHA256": hashlib.sha256(data).hexdigest(),
        "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(), "ContentLength": len(data),
        "Activate": True, "ModelName": "ssd", "ModelVersion": "3",
    }
    assert "SECRET" not in err  # the summary on stderr names the blob, not the signature
    parsed = DesiredModel.parse(desired)
    assert parsed is not None and parsed.sha256 == desired["ContentSHA256"]  # the module accepts it

    assert main([str(package), "--url", url, "--wrap", "--no-activate"]) == 0
    wrapped = json.loads(capsys.readouterr().out)
    assert wrapped["properties"]["desired"]["Activate"] is False
    assert main([str(tmp_path / "missing.zip"), "--url", url]) == 2
    assert main([str(package), "--url", "ftp://host/x.zip"]) == 2


def test_missing_test_services_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import iot_fixtures  # already loaded (and assertion-rewritten) through pytest_plugins

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install-test-services"):
        iot_fixtures.require_tool("no-such-broker-here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        iot_fixtures.require_tool("no-such-broker-here")


def test_desired_model_parsing() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    base = {"FileName": "m-1.zip", "DownloadUrl": "https://a.blob.core.windows.net/c/m.zip?sig=x",
            "ContentSHA256": sha.upper(), "ContentLength": "12", "Activate": "false", "$version": 7}
    model = DesiredModel.parse(base)
    assert model is not None
    assert (model.sha256, model.length, model.activate, model.desired_version) == (sha, 12, False, 7)
    assert DesiredModel.parse({"$version": 3}) is None
    # An unknown property is refused by name (a typo would otherwise read as "no model asked for").
    with pytest.raises(ValueError, match=r"unknown desired property 'DownloadURL'; did you mean 'DownloadUrl'\?"):
        DesiredModel.parse({"$version": 3, "FileName": "m.zip", "DownloadURL": "https://a/b?sig=x"})
    with pytest.raises(ValueError, match="unknown desired property 'Other'"):
        DesiredModel.parse({"$version": 3, "Other": 1})
    assert model.same_target(DesiredModel.parse(dict(base, **{"$version": 8})))  # type: ignore[arg-type]
    # A new URL (a fresh SAS) restarts the job, which resumes from the kept .part.
    assert not model.same_target(DesiredModel.parse(dict(base, DownloadUrl="https://b/c?sig=y")))  # type: ignore[arg-type]
    for bad in ({"FileName": "../evil.zip"}, {"FileName": ".hidden"}, {"DownloadUrl": "ftp://x/y"},
                {"ContentLength": -1}, {"ContentLength": 0}, {"ContentLength": 1.5}, {"ContentMD5": "nope"},
                {"Activate": "perhaps"}, {"ContentSHA256": "12" * 31}):
        with pytest.raises(ValueError):
            DesiredModel.parse(dict(base, **bad))


# ------------------------------------------------------------------- with the real pipeline and app
@pytest.fixture
async def real_rig(iot_hub: IotHub, blob_store: BlobStore, tmp_path: Path, settings: Settings,
                   pipeline: Any, start_watcher: Any) -> AsyncIterator[Rig]:
    """The twin service on the real pipeline (started, serving the bundled model) and folder watcher."""
    await start_watcher(pipeline)
    rig = Rig(iot_hub, blob_store, tmp_path, updates=pipeline, settings=settings)
    await rig.start()
    try:
        yield rig
    finally:
        await rig.stop()


async def test_real_app_happy_path(iot_hub: IotHub, blob_store: BlobStore, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole service as `edgeloader serve` builds it: desired patch -> download -> staging ->
    watcher -> pipeline (validate, install, warm up, flip) -> reported properties and DLModelOutput."""
    from aiohttp import web
    from packages import ssd_files, zip_bytes

    from supervisor.app import build_app
    from supervisor.settings import load_settings

    monkeypatch.setenv("EDGELOADER_CA_CERT", str(iot_hub.ca_file))
    settings = load_settings({
        "data_dir": tmp_path / "data", "twin": "auto", "connection_string": iot_hub.connection_string,
        "workers": 2, "runtime_threads": 1,
    }, env={})  # the default settle_seconds: a staged download does not wait for it
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    try:
        sim = iot_hub.sim
        # At start-up the module reports the model it serves (the bundled default).
        await eventually(lambda: sim.reported_copy().get("ModelUpdate", {}).get("ActiveModel"), 20,
                         "the start-up report of the active model")
        rig = Rig(iot_hub, blob_store, tmp_path)  # only for desired_for (twin-patch + upload)
        data = zip_bytes(ssd_files("tiny-ssd", "2"))
        desired = rig.desired_for("tiny-ssd-2.zip", data)
        started = time.monotonic()
        version = sim.set_desired(desired)
        status = await sim.wait_status("active", version, within=30)
        print(f"real app: desired patch -> active in {(time.monotonic() - started) * 1000:.0f} ms "
              f"(settle_seconds={settings.settle_seconds})")
        assert status["ActiveModel"]["Name"] == "tiny-ssd" and status["ActiveModel"]["Version"] == "2"
        assert sim.reported_copy()["LatestAIModelFileName"] == "tiny-ssd-2.zip"
        message = (await eventually(lambda: [m for m in sim.outputs("DLModelOutput")
                                             if m.body.get("model_version") == "2"], 10, "DLModelOutput"))[-1]
        assert (settings.data_dir / message.body["local_model_path"]).is_file()
        assert (settings.data_dir / message.body["local_labelmap_path"]).is_file()
        assert message.body["local_model_path"].endswith("model.onnx")
        assert not os.path.isabs(message.body["local_model_path"])
        assert os.listdir(settings.staging_dir) == []
    finally:
        await runner.cleanup()


async def test_real_pipeline_rejects_invalid_package(real_rig: Rig, blob_proxy: FaultProxy) -> None:
    from packages import BAD_PACKAGES

    _, make, _, words = BAD_PACKAGES["manifest-checksum"]
    version = real_rig.sim.set_desired(real_rig.desired_for("badsum-1.zip", make(), via=blob_proxy))
    status = await real_rig.sim.wait_status("failed", version, within=20)
    assert all(w in status["Reason"] for w in words), status
    connections = blob_proxy.connections
    await asyncio.sleep(1.0)
    assert blob_proxy.connections == connections == 1  # reported once, not retried
    assert real_rig.sim.reported_copy()["ModelUpdate"]["ActiveModel"]["Name"] != "badsum"


async def test_real_pipeline_a_package_rejected_before_is_reported_again(real_rig: Rig, settings: Settings,
                                                                        wait_until: Any) -> None:
    """The same bytes were dropped into the inbox and quarantined; asked for through the twin, the
    pipeline recognises them: the update is reported failed, saying so (not left 'verifying')."""
    from packages import BAD_PACKAGES

    _, make, _, _ = BAD_PACKAGES["garbage-model"]
    data = make()
    (settings.inbox_dir / "garbage-1.zip").write_bytes(data)
    pipeline = real_rig.pipeline
    await wait_until(lambda: pipeline.quarantine.entries(), 15, "the dropped package to be quarantined")
    version = real_rig.sim.set_desired(real_rig.desired_for("garbage-2.zip", data))
    status = await real_rig.sim.wait_status("failed", version, within=20)
    assert status["Reason"] == "already rejected (see quarantine)"


async def test_real_pipeline_reports_a_short_reason_without_device_paths(real_rig: Rig, settings: Settings) -> None:
    """The runtime's error, path and boilerplate gone: what the sender can act on, in ~200 characters."""
    from packages import BAD_PACKAGES

    _, make, _, _ = BAD_PACKAGES["garbage-model"]
    version = real_rig.sim.set_desired(real_rig.desired_for("garbage-1.zip", make()))
    status = await real_rig.sim.wait_status("failed", version, within=20)
    assert status["Reason"] == "onnxruntime cannot load model.onnx: Protobuf parsing failed."
    assert str(settings.data_dir) not in json.dumps(real_rig.sim.reported_copy())


async def test_real_pipeline_offline_catch_up(real_rig: Rig) -> None:
    from packages import ssd_files, zip_bytes

    sim, proxy = real_rig.sim, real_rig.hub.proxy
    proxy.offline()
    await eventually(lambda: real_rig.service.hub is not None and not real_rig.service.hub.connected, 10,
                     "the disconnect")
    version = sim.set_desired(real_rig.desired_for("tiny-ssd-3.zip", zip_bytes(ssd_files("tiny-ssd", "3"))))
    await asyncio.sleep(1.0)
    proxy.online()
    status = await sim.wait_status("active", version, within=30)
    assert (status["ActiveModel"]["Name"], status["ActiveModel"]["Version"]) == ("tiny-ssd", "3")
    assert await eventually(lambda: [m for m in sim.outputs("DLModelOutput")
                                     if m.body.get("model_version") == "3"], 10, "DLModelOutput")
