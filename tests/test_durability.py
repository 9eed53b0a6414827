"""Power-cut safety: what a rename or a symlink flip publishes is on disk before it, and the rename
or flip itself is on disk before the step that relies on it.

A power cut cannot be staged in a test, but its precondition can be watched: every ``os.fsync``,
``os.rename`` and ``os.replace`` the service makes is recorded (the path of a synced descriptor read
back from /proc, and the file's size on disk at that moment), and the order is checked. A missing
fsync is invisible in every other test (the page cache hides it until the power goes) and shows here;
so does an fsync of a file whose last bytes still sat in Python's buffer (no flush before it), and a
descriptor opened to sync something and never closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from packages import ssd_files, write_zip

from supervisor.formats import ACTIVATED_MARKER, INSTALL_RECORD
from supervisor.settings import Settings
from supervisor.twin.download import Download
from supervisor.twin.partfile import commit
from supervisor.updates.pipeline import Pipeline

if TYPE_CHECKING:
    from iot_fixtures import BlobServer

pytest_plugins = ["iot_fixtures"]


@dataclass(frozen=True)
class Op:
    kind: str  # "fsync", "rename" (os.rename and os.replace)
    path: str  # fsync: what was synced; rename: the destination
    source: str = ""  # rename: the source
    size: int | None = None  # fsync of a file: its size as the kernel had it (what the fsync made durable)
    fd: int = -1  # fsync: the descriptor
    inode: tuple[int, int] = (0, 0)  # fsync: what it was open on (st_dev, st_ino)


class DiskLog:
    """The fsyncs and renames made while it records, in order (from any thread)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def index(self, kind: str, path: Path | str, source: Path | str | None = None) -> int:
        """Position of the first matching operation (fails the test if there is none)."""
        want = entry(path) if kind == "rename" else os.path.realpath(path)
        for i, op in enumerate(self.ops):
            if op.kind == kind and op.path == want and (source is None or op.source == entry(source)):
                return i
        raise AssertionError(f"no {kind} of {path} among {len(self.ops)} operations: {self.ops}")

    def synced_before(self, path: Path | str, at: int, size: int | None = None) -> bool:
        """``path`` fsynced before operation ``at`` (with ``size`` bytes in it, when given)."""
        want = os.path.realpath(path)
        return any(op.kind == "fsync" and op.path == want and (size is None or op.size == size)
                   for op in self.ops[:at])

    def left_open(self) -> list[str]:
        """What was synced through a descriptor still open on it (opened to sync, never closed)."""
        still = []
        for op in self.ops:
            with contextlib.suppress(OSError):
                st = os.fstat(op.fd)
                if op.kind == "fsync" and (st.st_dev, st.st_ino) == op.inode:
                    still.append(op.path)
        return still

    def synced_right_after(self, path: Path | str, at: int) -> bool:
        """``path`` fsynced after operation ``at`` and before the next rename (what relies on it)."""
        want = os.path.realpath(path)
        for op in self.ops[at + 1 :]:
            if op.kind == "rename":
                return False
            if op.kind == "fsync" and op.path == want:
                return True
        return False


def entry(path: Path | str) -> str:
    """A directory entry as a rename sees it: its folder resolved, its own name kept (a symlink such as
    ``current`` is the entry, not what it points at)."""
    path = os.fspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


@pytest.fixture
def disk_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskLog]:
    log = DiskLog()
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        log.ops.append(Op("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), size=size, fd=fd,
                          inode=(st.st_dev, st.st_ino)))
        real_fsync(fd)

    def renamer(real):  # type: ignore[no-untyped-def]
        def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            real(src, dst, *args, **kwargs)
            log.ops.append(Op("rename", entry(dst), entry(src)))
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    yield log


async def test_an_installed_version_and_the_current_link_reach_the_disk_in_order(
    pipeline: Pipeline, settings: Settings, disk_log: DiskLog,
) -> None:
    """Install: the package's files, its install record and its folder are synced before the rename
    into models/, and models/<name> right after it. Flip: the data dir is synced right after the new
    ``current`` (and ``previous``) replace the old links, before anything else happens."""
    version = await pipeline.process(write_zip(settings.inbox_dir / "m.zip", ssd_files("tiny-ssd", "2")),
                                     source="inbox")
    assert version is not None and pipeline.repo.current() is not None
    assert pipeline.repo.current().key == ("tiny-ssd", "2")  # type: ignore[union-attr]
    target = settings.data_dir / "models" / "tiny-ssd" / "2"

    moved = disk_log.index("rename", target)
    workdir = Path(disk_log.ops[moved].source)
    assert workdir.parent == settings.staging_dir.resolve()
    # Every file the version folder holds, but the marker written into it after the flip.
    files = {p.relative_to(target): p.stat().st_size for p in target.rglob("*")
             if p.is_file() and p.name != ACTIVATED_MARKER}
    assert Path(INSTALL_RECORD) in files and Path("model.onnx") in files
    unsynced = [str(rel) for rel, size in files.items() if not disk_log.synced_before(workdir / rel, moved, size)]
    assert not unsynced, f"published by the rename before they were on disk, whole: {unsynced}"
    assert disk_log.synced_before(workdir, moved), "the version folder's entries were not synced before the rename"
    assert disk_log.synced_before(settings.data_dir / "models", moved), "models/tiny-ssd was new and not synced"
    assert disk_log.synced_right_after(target.parent, moved), "the rename into models/ was not made durable"

    for link in ("previous", "current"):
        flipped = disk_log.index("rename", settings.data_dir / link)
        assert flipped > moved
        assert disk_log.synced_right_after(settings.data_dir, flipped), f"the {link} flip was not made durable"
    # The activation history (what a rollback follows) is written the same way.
    history = disk_log.index("rename", settings.data_dir / "activations.json")
    size = (settings.data_dir / "activations.json").stat().st_size
    assert disk_log.synced_before(Path(disk_log.ops[history].source), history, size), "history renamed unsynced"
    assert disk_log.synced_right_after(settings.data_dir, history)
    assert disk_log.left_open() == [], "descriptors opened to sync were not closed"


async def test_a_download_is_on_disk_before_it_is_handed_to_the_pipeline(
    tmp_path: Path, blob_server: BlobServer, disk_log: DiskLog,
) -> None:
    """The verified ``.part`` file is synced before ``commit`` renames it into staging (where the
    watcher takes it at once), its intent is synced before its own rename, and staging is synced
    after both."""
    data = hashlib.sha256(b"durable").digest() * 30  # 960 bytes: one write, kept in Python's buffer until a flush
    blob_server.put("m.zip", data)
    staging = tmp_path / "staging"
    staging.mkdir()
    part, dest = staging / "m.zip.part", staging / "m.zip"
    result = await Download(blob_server.url("m.zip"), part, sha256=hashlib.sha256(data).hexdigest()).run()
    commit(result.path, dest, {"source": "twin", "sha256": result.sha256})
    assert dest.read_bytes() == data
    assert json.loads((staging / "m.zip.intent.json").read_text())["size"] == len(data)

    handed = disk_log.index("rename", dest, source=part)
    assert disk_log.synced_before(part, handed, len(data)), "the .part file was renamed into staging unsynced"
    intent = disk_log.index("rename", staging / "m.zip.intent.json")
    assert intent < handed, "the intent must be there before the package"
    intent_size = (staging / "m.zip.intent.json").stat().st_size
    assert disk_log.synced_before(Path(disk_log.ops[intent].source), intent, intent_size), \
        "the intent was renamed unsynced"
    assert disk_log.synced_right_after(staging, handed), "the renames into staging were not made durable"
    assert disk_log.left_open() == [], "descriptors opened to sync were not closed"
