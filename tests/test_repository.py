"""The repository on disk: install by rename, atomic flip, retention, repair, start-up fallback."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from packages import BUNDLED, ssd_files, write_folder

from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import INSTALL_RECORD, InstalledVersion, Repository


def install(repo: Repository, name: str, version: str, files: dict[str, bytes] | None = None) -> InstalledVersion:
    workdir = repo.new_workdir()
    write_folder(workdir, files or {"model.onnx": b"not loaded here", "labels.txt": b"a\n"})
    return repo.install(workdir, name, version, {"package": f"{name}-{version}.zip"})


def test_install_moves_a_complete_folder_into_place(repo: Repository) -> None:
    v = install(repo, "m", "1")
    assert v.path == repo.models_dir / "m" / "1"
    assert (v.path / "model.onnx").read_bytes() == b"not loaded here"
    assert (v.path / INSTALL_RECORD).is_file()
    assert list(repo.staging_dir.iterdir()) == []  # the workdir was renamed, not copied
    assert repo.get("m", "1") == v
    assert repo.get("m", "2") is None
    assert repo.get("..", "m") is None


def test_flip_sets_current_and_previous(repo: Repository) -> None:
    v1, v2, v3 = (install(repo, "m", str(i)) for i in (1, 2, 3))
    assert repo.current() is None
    repo.flip(v1)
    assert repo.current() == v1 and repo.previous() is None
    repo.flip(v2)
    assert repo.current() == v2 and repo.previous() == v1
    repo.flip(v2)  # flipping to the current one changes nothing
    assert repo.current() == v2 and repo.previous() == v1
    repo.flip(v3)
    assert repo.current() == v3 and repo.previous() == v2
    # Relative links: the data dir can be moved or bind-mounted elsewhere.
    assert os.readlink(repo.current_link) == os.path.join("models", "m", "3")


def test_current_always_resolves_while_flipping(repo: Repository) -> None:
    """A reader never sees `current` missing or half-written, however the flips interleave."""
    a, b = install(repo, "m", "a"), install(repo, "m", "b")
    repo.flip(a)
    stop = threading.Event()
    flips = 0

    def flipper() -> None:
        nonlocal flips
        while not stop.is_set():
            repo.flip(b if flips % 2 else a)
            flips += 1

    thread = threading.Thread(target=flipper)
    thread.start()
    seen: set[str] = set()
    reads = 0
    deadline = time.monotonic() + 10
    try:
        while flips < 100 and time.monotonic() < deadline:  # each flip fsyncs: a few ms
            reads += 1
            current = repo.current()
            assert current is not None, "current did not resolve mid-flip"
            seen.add(current.version)
            assert (repo.current_link / "model.onnx").is_file()
    finally:
        stop.set()
        thread.join()
    assert flips >= 100 and reads > flips and seen == {"a", "b"}
    assert not list(repo.data_dir.glob("*.tmp-*")), "a temp link was left behind"


def test_prune_keeps_the_newest_and_never_current_or_previous(repo: Repository) -> None:
    versions = [install(repo, "m", str(i)) for i in range(1, 7)]
    other = install(repo, "other", "1")
    repo.flip(versions[1])  # 2 becomes previous
    repo.flip(versions[0])  # rolled back to the oldest: 1 is current
    removed = repo.prune(keep=3)
    assert sorted(v.version for v in removed) == ["3"]
    kept = [v.version for v in repo.versions() if v.name == "m"]
    assert kept == ["1", "2", "4", "5", "6"]  # current, previous, and the newest three
    assert repo.get("other", "1") == other  # retention is per model name
    # Removal renames into staging first, then deletes: nothing is left there either.
    assert list(repo.staging_dir.iterdir()) == []


def test_prune_never_deletes_a_just_stored_version(repo: Repository) -> None:
    v1, v2 = install(repo, "m", "1"), install(repo, "m", "2")
    repo.flip(v1)
    repo.flip(v2)
    stored = install(repo, "m", "3")  # "activate": false: installed, not current
    repo.prune(keep=1)
    assert {v.version for v in repo.versions()} == {"1", "2", "3"}
    assert repo.get("m", "3") == stored


def test_repair_removes_what_a_crash_leaves(repo: Repository) -> None:
    good = install(repo, "m", "1")
    repo.flip(good)
    # A version being unpacked, a deletion in progress, a half-made symlink, a version folder
    # without its install record (renamed in by hand or from an old layout).
    work = repo.new_workdir()
    (work / "model.onnx").write_bytes(b"half")
    (repo.staging_dir / ".tmp-del-1234").mkdir()
    (repo.inbox_dir / ".tmp-del-5678").mkdir()  # a folder package half deleted after its install
    (repo.inbox_dir / ".tmp-del-5678" / "labels.txt").write_text("a\n")
    os.symlink("models/m/1", repo.data_dir / "current.tmp-deadbeef")
    recordless = repo.models_dir / "m" / "2"
    recordless.mkdir()
    (recordless / "model.onnx").write_bytes(b"x")
    # A package waiting in staging (not a temp folder) must survive.
    (repo.staging_dir / "waiting.zip").write_bytes(b"PK")

    removed = repo.repair()

    assert not work.exists() and not recordless.exists()
    assert not (repo.data_dir / "current.tmp-deadbeef").is_symlink()
    assert sorted(p.name for p in repo.staging_dir.iterdir()) == ["waiting.zip"]
    assert list(repo.inbox_dir.iterdir()) == []
    assert repo.current() == good and repo.versions() == [good]
    assert len(removed) == 5


async def _start(settings: Settings, repo: Repository, engine: Engine) -> tuple[Pipeline, EventBus]:
    events = EventBus()
    pipeline = Pipeline(settings, repo, engine, events)
    await pipeline.start()
    return pipeline, events


async def test_start_serves_current(settings: Settings, repo: Repository, engine: Engine) -> None:
    v1 = install(repo, "tiny-ssd", "1", ssd_files("tiny-ssd", "1"))
    install(repo, "tiny-ssd", "2", ssd_files("tiny-ssd", "2"))
    repo.flip(v1)
    await _start(settings, repo, engine)
    assert engine.active is not None and engine.active.info.version == "1"
    assert repo.current() == v1


async def test_start_falls_back_to_the_newest_valid_version(
    settings: Settings, repo: Repository, engine: Engine
) -> None:
    install(repo, "tiny-ssd", "1", ssd_files("tiny-ssd", "1"))
    v2 = install(repo, "tiny-ssd", "2", ssd_files("tiny-ssd", "2"))
    broken = install(repo, "tiny-ssd", "3", ssd_files("tiny-ssd", "3"))
    (broken.path / "model.onnx").write_bytes(b"bit rot")  # e.g. a failing SD card
    repo.flip(broken)
    pipeline, events = await _start(settings, repo, engine)
    assert engine.active is not None and engine.active.info.version == "2"
    assert repo.current() == v2, "current should point at what is served"
    assert [e.version for e in events.history if e.state == "active"] == ["2"]
    assert pipeline.active() is not None


async def test_start_with_a_dangling_current_link(settings: Settings, repo: Repository, engine: Engine) -> None:
    v1 = install(repo, "tiny-ssd", "1", ssd_files("tiny-ssd", "1"))
    os.symlink("models/tiny-ssd/9", repo.current_link)  # a version deleted by hand
    await _start(settings, repo, engine)
    assert engine.active is not None and engine.active.info.version == "1"
    assert repo.current() == v1


async def test_start_falls_back_to_the_bundled_model(settings: Settings, repo: Repository, engine: Engine) -> None:
    broken = install(repo, "tiny-ssd", "1", ssd_files("tiny-ssd", "1"))
    (broken.path / "labels.txt").unlink()
    repo.flip(broken)
    await _start(settings, repo, engine)
    assert engine.active is not None
    assert (engine.active.info.name, engine.active.info.version) == ("blazeface-short-range", "1")
    current = repo.current()
    assert current is not None and current.key == ("blazeface-short-range", "1")
    assert (current.path / "face_detection_short_range.tflite").read_bytes() == (
        BUNDLED / "face_detection_short_range.tflite"
    ).read_bytes()


def test_versions_ignores_unrelated_files(repo: Repository, tmp_path: Path) -> None:
    (repo.models_dir / "README").write_text("not a model")
    install(repo, "m", "1")
    assert [v.key for v in repo.versions()] == [("m", "1")]


def test_a_data_dir_without_models_has_no_versions(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "fresh")  # before ensure_layout: nothing there yet
    assert repo.versions() == [] and repo.current() is None and repo.find_by_package_sha256("0" * 64) is None
