"""The drop-folder watcher: complete packages are processed once, copies in progress are waited
for, temp names are ignored, late sidecars are read, packages present at start are picked up.

Most tests run the real pipeline. ``Recorder`` stands in for it where a test is about what the
watcher hands over and when (how often, in which order), which the real one hides by deleting
or quarantining each package."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from packages import last, ssd_files, states, write_folder, write_zip, zip_bytes
from waiting import eventually

from supervisor.app import build_app
from supervisor.http.keys import PIPELINE
from supervisor.serving.engine import Engine
from supervisor.settings import Settings, load_settings
from supervisor.twin.partfile import commit
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository
from supervisor.updates.watcher import PackageWatcher, is_candidate_name, sidecar_owner

if TYPE_CHECKING:
    from conftest import StartWatcher, WaitUntil, WriteSoon


class Recorder:
    """Records what the watcher hands over; removes each package like the pipeline (or not)."""

    def __init__(self, remove: bool = True, seconds: float = 0.0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.remove = remove
        self.seconds = seconds
        self.running = 0
        self.most_at_once = 0

    async def process(self, package: Path, source: str) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.calls.append((package.name, source))
        await asyncio.sleep(self.seconds)
        if self.remove:
            await asyncio.to_thread(package.unlink)
        self.running -= 1

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def active_events(events: EventBus) -> list[tuple[str | None, str | None]]:
    return [(e.name, e.version) for e in events.history if e.state == "active" and e.source != "startup"]


def test_names() -> None:
    for name in ("model.zip", "faces", "detector.onnx", "v2.tflite", "Model (1).zip"):
        assert is_candidate_name(name), name
    for name in ("model.zip.part", "model.zip.crdownload", "model.zip.tmp", "~$model.zip", ".~lock.model.zip#",
                 ".tmp-1234abcd", ".DS_Store", "model.zip.sha256", "model.zip.md5", "model.zip.intent.json",
                 "model.zip.intent.json.part", "Thumbs.db", "desktop.ini", "model.zip~", ".model.zip.Xy12Ab"):
        assert not is_candidate_name(name), name
    assert sidecar_owner("model.zip.sha256") == "model.zip"
    assert sidecar_owner("model.zip.intent.json") == "model.zip"
    assert sidecar_owner("model.zip") is None


async def test_a_slow_copy_activates_once_when_complete(
    pipeline: Pipeline, settings: Settings, events: EventBus, engine: Engine,
    start_watcher: StartWatcher, write_soon: WriteSoon, wait_until: WaitUntil,
) -> None:
    """A USB copy trickling in over ~2 s: the zip is complete only when its central directory
    (the last bytes) lands; until then it is neither processed nor rejected."""
    await start_watcher(pipeline)
    data = zip_bytes(ssd_files("tiny-ssd", "2"))
    started = time.monotonic()
    writer = write_soon(settings.inbox_dir / "update.zip", data, seconds=2.0, chunks=20)
    await wait_until(lambda: active_events(events), within=10, what="the model to become active")
    assert time.monotonic() - started > 1.8, "activated before the copy finished"
    writer.join()
    await asyncio.sleep(3 * settings.settle_seconds)  # nothing more comes
    assert active_events(events) == [("tiny-ssd", "2")]
    assert "rejected" not in states(events)
    assert states(events, "update.zip") == ["received", "validating", "activating", "active"]
    assert engine.active is not None and engine.active.info.name == "tiny-ssd"


async def test_a_slow_bare_model_copy_waits_for_settle(
    settings: Settings, start_watcher: StartWatcher, write_soon: WriteSoon, wait_until: WaitUntil,
) -> None:
    """A bare model file has no end marker: only the settle time tells the copy is over."""
    recorder = Recorder()
    await start_watcher(recorder)
    data = os.urandom(40_000)
    started = time.monotonic()
    write_soon(settings.inbox_dir / "detector.onnx", data, seconds=1.5, chunks=15).join()
    finished = time.monotonic()
    await wait_until(lambda: recorder.calls, within=5, what="the file to be handed over")
    handed_at = time.monotonic()
    assert recorder.calls == [("detector.onnx", "inbox")]
    assert handed_at - finished >= settings.settle_seconds * 0.9
    assert handed_at - started > 1.5


async def test_a_folder_copied_file_by_file(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline)
    folder = settings.inbox_dir / "faces-v3"
    folder.mkdir()
    for rel, data in ssd_files("tiny-ssd", "3").items():
        # Each file arrives as a .part and is renamed, like rsync or a browser download.
        await asyncio.to_thread((folder / f"{rel}.part").write_bytes, data)
        await asyncio.sleep(settings.settle_seconds * 1.5)
        os.rename(folder / f"{rel}.part", folder / rel)
    await wait_until(lambda: active_events(events), within=5, what="the folder package to activate")
    assert active_events(events) == [("tiny-ssd", "3")]
    assert "rejected" not in states(events)
    await wait_until(lambda: not folder.exists(), within=2, what="the package to be removed after activation")


async def test_partial_and_temp_names_are_left_alone(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    recorder = Recorder()
    await start_watcher(recorder)
    inbox, staging = settings.inbox_dir, settings.staging_dir
    for name in ("model.zip.part", "model.zip.crdownload", "~$model.zip", ".~lock.model.zip#", "Thumbs.db",
                 "model.zip.sha256"):
        (inbox / name).write_bytes(b"x")
    (staging / ".tmp-0123456789ab").mkdir()  # the repository building a version
    (staging / ".tmp-0123456789ab" / "model.onnx").write_bytes(b"x")
    (staging / "download.zip.part").write_bytes(b"PK\x03\x04")
    await asyncio.sleep(settings.settle_seconds * 4)
    assert recorder.calls == []
    os.rename(inbox / "model.zip.part", inbox / "model.zip")  # the copy finished
    await wait_until(lambda: recorder.calls, within=5, what="the renamed package")
    await asyncio.sleep(settings.settle_seconds * 2)
    assert recorder.calls == [("model.zip", "inbox")]


async def test_a_late_sidecar_is_read(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    """The checksum file lands just after the package: it is still checked (here: it does not match)."""
    await start_watcher(pipeline)
    package = write_zip(settings.inbox_dir / "m.zip", ssd_files("tiny-ssd", "4"))
    await asyncio.sleep(settings.settle_seconds / 2)
    (settings.inbox_dir / "m.zip.sha256").write_text("0" * 64 + "  m.zip\n")
    rejected = await wait_until(lambda: last(events, "rejected"), within=5, what="the package to be rejected")
    assert "package SHA-256" in (rejected.reason or "")
    assert not package.exists() and not (settings.inbox_dir / "m.zip.sha256").exists()
    assert active_events(events) == []


async def test_packages_present_at_start_are_processed(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    write_zip(settings.inbox_dir / "a.zip", ssd_files("tiny-ssd", "5"))
    write_zip(settings.staging_dir / "b.zip", ssd_files("other-ssd", "1"))
    await start_watcher(pipeline)
    await wait_until(lambda: len(active_events(events)) == 2, within=5, what="both packages")
    assert sorted(active_events(events)) == [("other-ssd", "1"), ("tiny-ssd", "5")]
    sources = {e.package: e.source for e in events.history if e.state == "active" and e.source != "startup"}
    assert sources == {"a.zip": "inbox", "b.zip": "staging"}


async def test_packages_are_processed_one_at_a_time(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    recorder = Recorder(seconds=0.2)
    for i in range(3):
        (settings.inbox_dir / f"{i}.zip").write_bytes(zip_bytes({"a": b"x"}))
    await start_watcher(recorder)
    await wait_until(lambda: len(recorder.calls) == 3 and recorder.running == 0, within=5, what="3 packages")
    assert recorder.most_at_once == 1
    assert sorted(recorder.names()) == ["0.zip", "1.zip", "2.zip"]


async def test_a_package_left_in_place_is_not_retried_until_it_changes(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    recorder = Recorder(remove=False)
    path = settings.inbox_dir / "stuck.zip"
    path.write_bytes(zip_bytes({"a": b"x"}))
    await start_watcher(recorder, rescan_seconds=0.3)
    await wait_until(lambda: recorder.calls, within=5, what="the first hand-over")
    await asyncio.sleep(1.0)  # several rescans
    assert recorder.names() == ["stuck.zip"]
    path.write_bytes(zip_bytes({"a": b"changed"}))
    await wait_until(lambda: len(recorder.calls) == 2, within=5, what="the changed package")


async def test_a_copy_that_stopped_half_way_is_waited_for_then_rejected(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline, incomplete_timeout=1.0)
    data = zip_bytes(ssd_files("tiny-ssd", "6"))
    path = settings.inbox_dir / "cut.zip"
    path.write_bytes(data[: len(data) // 2])
    started = time.monotonic()
    rejected = await wait_until(lambda: last(events, "rejected"), within=6, what="the rejection")
    assert time.monotonic() - started >= 1.0, "an incomplete zip is waited for first"
    assert "not a valid zip" in (rejected.reason or "")


async def test_a_copy_that_resumes_is_taken_whole(
    pipeline: Pipeline, settings: Settings, events: EventBus, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    """A copy stalling for longer than the settle time (a USB hiccup) is not rejected."""
    await start_watcher(pipeline, incomplete_timeout=10.0)
    data = zip_bytes(ssd_files("tiny-ssd", "7"))
    path = settings.inbox_dir / "stall.zip"
    with path.open("wb") as f:
        f.write(data[:1000])
        f.flush()
        await asyncio.sleep(settings.settle_seconds * 4)
        f.write(data[1000:])
    await wait_until(lambda: active_events(events), within=5, what="the activation")
    assert active_events(events) == [("tiny-ssd", "7")]
    assert "rejected" not in states(events)


async def test_the_incomplete_timeout_setting_reaches_the_service_watcher(
    aiohttp_client, tmp_path: Path, wait_until: WaitUntil,
) -> None:
    """EDGELOADER_INCOMPLETE_TIMEOUT_SECONDS shortens the wait for a cut copy (120 s by default)."""
    settings = load_settings(
        {"data_dir": tmp_path, "twin": "off", "settle_seconds": 0.2, "workers": 1, "runtime_threads": 1},
        env={"EDGELOADER_INCOMPLETE_TIMEOUT_SECONDS": "1.5", "EDGELOADER_RESCAN_SECONDS": "2"},
    )
    assert (settings.incomplete_timeout_seconds, settings.rescan_seconds) == (1.5, 2.0)
    client = await aiohttp_client(build_app(settings))
    data = zip_bytes(ssd_files("tiny-ssd", "8"))
    (settings.inbox_dir / "cut.zip").write_bytes(data[: len(data) // 2])
    started = time.monotonic()
    quarantine = client.app[PIPELINE].quarantine
    await wait_until(quarantine.entries, within=15, what="the cut copy to be quarantined")
    assert time.monotonic() - started >= 1.5, "an incomplete zip is waited for first"
    rejected = (await (await client.get("/models")).json())["rejected"]
    assert [e["package"] for e in rejected] == ["cut.zip"]
    assert "truncated" in rejected[0]["reason"]


@pytest.mark.parametrize("name", ["settle_seconds", "incomplete_timeout_seconds", "rescan_seconds"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_watcher_durations_must_be_positive(name: str, value: str) -> None:
    env_name = f"EDGELOADER_{name.upper()}"
    with pytest.raises(ValueError, match=rf"bad setting: {name} \({env_name}\) must be a number of seconds above 0"):
        load_settings(env={env_name: value})


async def test_a_download_committed_to_staging_is_taken_at_once(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    """partfile.commit() renames a verified download into staging whole: no settle wait (5 s here),
    while a file dropped into the inbox at the same moment still waits for it."""
    recorder = Recorder()
    await start_watcher(recorder, settle_seconds=5.0)
    data = zip_bytes({"a": os.urandom(100_000)})
    part = settings.staging_dir / "m.zip.part"
    part.write_bytes(data)
    (settings.inbox_dir / "dropped.zip").write_bytes(data)
    started = time.monotonic()
    await asyncio.to_thread(commit, part, settings.staging_dir / "m.zip",
                            {"source": "twin", "sha256": hashlib.sha256(data).hexdigest()})
    await wait_until(lambda: recorder.calls, within=1.0, what="the committed package, well before the settle time")
    assert recorder.calls == [("m.zip", "staging")]
    assert time.monotonic() - started < 1.0
    await wait_until(lambda: len(recorder.calls) == 2, within=8, what="the dropped package")
    assert recorder.calls[1] == ("dropped.zip", "inbox")
    assert time.monotonic() - started >= 5.0, "a dropped file still waits for the settle time"


async def test_staging_without_a_matching_intent_waits_for_settle(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    """A file in staging is taken at once only when its intent names its size: one whose intent
    is stale (a crash between the renames, then another file under that name) settles first."""
    recorder = Recorder()
    await start_watcher(recorder, settle_seconds=2.0)
    data = zip_bytes({"a": os.urandom(50_000)})
    (settings.staging_dir / "m.zip.intent.json").write_text(json.dumps({"source": "twin", "size": len(data) + 1}))
    started = time.monotonic()
    (settings.staging_dir / "m.zip").write_bytes(data)
    await wait_until(lambda: recorder.calls, within=5, what="the package")
    assert time.monotonic() - started >= 2.0
    assert recorder.calls == [("m.zip", "staging")]


async def test_polling_mode(settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil) -> None:
    """The fallback for filesystems without notifications (WATCHFILES_FORCE_POLLING=1)."""
    recorder = Recorder()
    await start_watcher(recorder, force_polling=True)
    (settings.inbox_dir / "p.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: recorder.calls, within=5, what="the polled package")


async def test_the_watcher_keeps_going_after_a_pipeline_crash(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    class Flaky(Recorder):
        async def process(self, package: Path, source: str) -> None:
            await super().process(package, source)
            if package.name == "boom.zip":
                raise RuntimeError("a bug")

    flaky = Flaky()
    await start_watcher(flaky)
    (settings.inbox_dir / "boom.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: flaky.calls, within=5, what="the first package")
    (settings.inbox_dir / "next.zip").write_bytes(zip_bytes({"a": b"y"}))
    await wait_until(lambda: len(flaky.calls) == 2, within=5, what="the next package")


async def test_the_watched_folders_are_created(
    repo: Repository, settings: Settings, start_watcher: StartWatcher,
) -> None:
    os.rmdir(settings.inbox_dir)
    await start_watcher(Recorder())
    assert settings.inbox_dir.is_dir()




@pytest.mark.parametrize("force_polling", [False, True], ids=["inotify", "polling"])
async def test_relative_folders_are_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_until: WaitUntil, force_polling: bool,
) -> None:
    """The default data dir is ./var: inotify reports absolute paths for a relative watch, polling
    relative ones. Both must reach the candidate (not only the slow rescan)."""
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    watcher = PackageWatcher(recorder, Path("var/inbox"), Path("var/staging"), 0.1,
                             force_polling=force_polling, rescan_seconds=60)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.3)
        (tmp_path / "var" / "inbox" / "p.zip").write_bytes(zip_bytes({"a": b"x"}))
        await wait_until(lambda: recorder.calls, within=3, what="the package")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class SizeRecorder(Recorder):
    """Also records the size of each file as it is handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def process(self, package: Path, source: str) -> None:
        self.sizes.append(package.stat().st_size)
        await super().process(package, source)


async def test_a_file_that_keeps_growing_is_not_handed_over_until_it_stops(
    settings: Settings, start_watcher: StartWatcher, write_soon: WriteSoon, wait_until: WaitUntil, tmp_path: Path,
) -> None:
    """A copy whose writes the OS does not report (a network share; here a file written through another
    name, a hard link outside the inbox): after the one notification of its arrival, only the settle
    wait itself can see it grow (size, mtime), and it must wait again until it stops. A bare model
    file, so that no zip end marker helps."""
    recorder = SizeRecorder()
    await start_watcher(recorder, settle_seconds=0.25)
    outside = tmp_path / "copying.onnx"
    outside.write_bytes(b"\0")
    os.link(outside, settings.inbox_dir / "detector.onnx")
    data = os.urandom(400_000)
    writer = write_soon(outside, data, seconds=2.0, chunks=40)  # a write every 50 ms
    await wait_until(lambda: recorder.calls, within=10, what="the file to be handed over")
    assert recorder.sizes == [len(data)], "handed over while it was still being written"
    assert not writer.is_alive()


@pytest.mark.parametrize("target", ["zip", "folder", "dangling"])
async def test_a_symlink_dropped_as_a_package_is_quarantined(
    pipeline: Pipeline, settings: Settings, events: EventBus, engine: Engine, start_watcher: StartWatcher,
    wait_until: WaitUntil, tmp_path: Path, target: str,
) -> None:
    """A package is the file or folder itself: a symlink (to a zip, to a folder, or to nothing at all)
    could bring in anything the service can read. It is quarantined, not followed, and what it points
    at is left alone."""
    elsewhere = tmp_path / "elsewhere"
    if target == "zip":
        pointed = write_zip(elsewhere / "m.zip", ssd_files("tiny-ssd", "9"))
    elif target == "folder":
        pointed = write_folder(elsewhere / "pkg", ssd_files("tiny-ssd", "9"))
    else:
        pointed = elsewhere / "gone.zip"
    before = sorted(p.relative_to(tmp_path) for p in elsewhere.rglob("*")) if elsewhere.exists() else []
    await start_watcher(pipeline)
    link = settings.inbox_dir / "m.zip"
    os.symlink(pointed, link)
    rejected = await wait_until(lambda: last(events, "rejected"), within=5, what="the symlink to be rejected")
    assert rejected.package == "m.zip" and "symlink" in (rejected.reason or "")
    assert active_events(events) == [] and engine.active is not None
    assert engine.active.info.name == "blazeface-short-range"
    assert not os.path.lexists(link), "the symlink is still in the inbox"
    [entry] = pipeline.quarantine.entries()
    kept = settings.quarantine_dir / entry["entry"] / "m.zip"
    assert kept.is_symlink() and os.readlink(kept) == str(pointed)  # the link itself, as dropped
    after = sorted(p.relative_to(tmp_path) for p in elsewhere.rglob("*")) if elsewhere.exists() else []
    assert after == before, "what the symlink points at was touched"


async def test_a_folder_package_over_max_package_bytes_is_quarantined(
    settings: Settings, repo: Repository, engine: Engine, events: EventBus, start_watcher: StartWatcher,
    wait_until: WaitUntil, tmp_path: Path,
) -> None:
    files = ssd_files("tiny-ssd", "10", extra_files={"padding.bin": os.urandom(300_000)})
    total = sum(len(d) for d in files.values())
    pipeline = Pipeline(settings.replace(max_package_bytes=total - 1), repo, engine, events)
    await pipeline.start()
    await start_watcher(pipeline)
    staged = write_folder(tmp_path / "pkg", files)
    os.rename(staged, settings.inbox_dir / "big")  # dropped whole
    rejected = await wait_until(lambda: last(events, "rejected"), within=5, what="the folder to be rejected")
    assert rejected.package == "big"
    assert rejected.reason == f"package folder holds more than {total - 1} bytes; the limit is {total - 1}"
    assert active_events(events) == [] and repo.get("tiny-ssd", "10") is None


async def test_the_inbox_removed_and_created_again_is_watched_again(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    """The inbox on a USB stick that is unplugged and plugged back: the folder goes away and comes back.
    The watcher lives through it, and the slow rescan finds what is dropped after (the OS watch on the
    old folder is gone)."""
    recorder = Recorder()
    await start_watcher(recorder, rescan_seconds=0.3)
    settings.inbox_dir.rmdir()
    await asyncio.sleep(1.0)  # rescans meet a missing folder
    settings.inbox_dir.mkdir()
    (settings.inbox_dir / "back.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: recorder.calls, within=10, what="the package dropped after the folder came back")
    assert recorder.calls == [("back.zip", "inbox")]


async def test_a_folder_package_with_a_temp_file_in_a_subfolder_waits(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    recorder = Recorder()
    await start_watcher(recorder)
    folder = write_folder(settings.inbox_dir / "pkg", {"model.json": b"{}", "weights/model.onnx.part": b"m"})
    await asyncio.sleep(settings.settle_seconds * 4)
    assert recorder.calls == [], "handed over with a file still being copied in a subfolder"
    os.rename(folder / "weights" / "model.onnx.part", folder / "weights" / "model.onnx")
    await wait_until(lambda: recorder.calls, within=5, what="the folder once its copy is complete")


async def test_stopping_the_watcher_ends_its_settle_timers(settings: Settings, repo: Repository) -> None:
    watcher = PackageWatcher(Recorder(), settings.inbox_dir, settings.staging_dir, settle_seconds=30.0)
    task = asyncio.create_task(watcher.run())
    (settings.inbox_dir / "waiting.zip").write_bytes(zip_bytes({"a": b"x"}))
    settling = await eventually(lambda: [t for t in asyncio.all_tasks() if t.get_name() == "settle:waiting.zip"],
                                5, "the package's settle timer")
    task.cancel()
    # Stopped at once, not after the 30 s settle wait (a service shutdown is bounded by IoT Edge).
    done, _ = await asyncio.wait([task], timeout=5)
    assert task in done and task.cancelled(), "the watcher waited for its settle timers to run out"
    assert all(t.done() for t in settling), "a settle timer outlived the watcher"


@pytest.mark.parametrize("error", [OSError, RuntimeError])
async def test_a_package_that_cannot_be_looked_at_is_still_handed_over(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
) -> None:
    """Whatever goes wrong while looking at a package, it is not left lying there unexplained: an
    unreadable one (OSError: the copier may still be setting permissions) is waited for like an
    incomplete copy, then handed over; a bug of ours (anything else) hands it over at once. The pipeline
    says what is wrong with it. (As root, no file can be made unreadable: the check is scripted to fail.)"""
    import supervisor.updates.watcher as watcher_module

    def failing(_path: Path) -> bool:
        raise error("cannot look")

    monkeypatch.setattr(watcher_module, "is_complete_zip", failing)
    recorder = Recorder()
    await start_watcher(recorder, incomplete_timeout=1.0)
    started = time.monotonic()
    (settings.inbox_dir / "odd.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: recorder.calls, within=6, what="the package to be handed over")
    waited = time.monotonic() - started
    if error is OSError:
        assert waited >= 1.0, "an unreadable package is waited for like an incomplete copy"
    else:
        assert waited < 1.0
    assert recorder.calls == [("odd.zip", "inbox")]


async def test_a_bug_while_settling_still_hands_the_package_over(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import supervisor.updates.watcher as watcher_module

    def broken(_path: Path, _snap: object) -> bool:
        raise RuntimeError("a bug in the committed-download check")

    monkeypatch.setattr(watcher_module, "_is_committed", broken)
    recorder = Recorder()
    await start_watcher(recorder)
    (settings.staging_dir / "m.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: recorder.calls, within=5, what="the package, despite the failing check")
    assert recorder.calls == [("m.zip", "staging")]


async def test_a_package_that_goes_or_changes_while_waiting_its_turn(
    settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil, tmp_path: Path,
) -> None:
    """Packages wait their turn while another one is processed. One deleted meanwhile is dropped from
    the queue; one that changes meanwhile (written through another name: no notification) settles
    again and is handed over as it ends up. The queue goes on either way."""
    recorder = SizeRecorder()
    recorder.seconds = 2.0  # the first package takes that long
    await start_watcher(recorder)
    (settings.inbox_dir / "first.zip").write_bytes(zip_bytes({"a": b"x"}))
    await wait_until(lambda: recorder.calls, within=5, what="the first package to be taken")
    (settings.inbox_dir / "gone.zip").write_bytes(zip_bytes({"b": b"y"}))
    outside = tmp_path / "copying.onnx"
    outside.write_bytes(b"\0" * 1000)
    os.link(outside, settings.inbox_dir / "grows.onnx")
    await asyncio.sleep(0.8)  # both settle and wait in the queue behind the first
    (settings.inbox_dir / "gone.zip").unlink()
    with outside.open("ab") as f:
        f.write(b"\1" * 500)
    await wait_until(lambda: len(recorder.calls) == 2, within=8, what="the changed package")
    assert recorder.names() == ["first.zip", "grows.onnx"] and recorder.sizes[1] == 1500
