"""Bounded disk (issue 16): the quarantine keeps at most `quarantine_keep` packages and
`quarantine_max_bytes` (reasons stay longer than bytes); a full disk, met before or in the middle of
any write, leaves the repository consistent and the old model serving, and is the device's condition,
not the package's defect: the package is neither quarantined nor remembered as bad, and it installs
once space returns. Tried by injecting ENOSPC at each write and on a real 60 MB tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pathlib
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from packages import last, ssd_files, states, write_folder, write_zip

import supervisor.diskspace
import supervisor.updates.repository as repository_module
from supervisor.formats import REASON_FILE
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.quarantine import MAX_RECORDS
from supervisor.updates.repository import Repository


async def started(settings: Settings, engine: Engine, events: EventBus) -> Pipeline:
    repo = Repository(settings.data_dir)
    repo.ensure_layout()
    pipeline = Pipeline(settings, repo, engine, events)
    pipeline.space_wait.interval = 0.05
    await pipeline.start()
    return pipeline


# -- the quarantine's bounds ------------------------------------------------------------------------


async def test_fifty_bad_packages_leave_a_bounded_quarantine(
    settings: Settings, engine: Engine, events: EventBus,
) -> None:
    bounded = settings.replace(quarantine_keep=5, quarantine_max_bytes=3_000_000)
    pipeline = await started(bounded, engine, events)
    rng = random.Random(16)
    inbox = pipeline.repo.inbox_dir
    first = b""
    for i in range(50):
        package = inbox / f"bad-{i:02}.zip"
        # Not a zip at all; 0.4 to 1.2 MB each (40 MB together); one too big to keep on its own.
        data = rng.randbytes(4_000_000 if i == 25 else rng.randrange(400_000, 1_200_000))
        first = first or data
        package.write_bytes(data)
        assert await pipeline.process(package, source="inbox") is None
    entries = pipeline.quarantine.entries()
    assert len(entries) == 50, "every reason is kept"
    kept = [e for e in entries if e.get("kept")]
    assert len(kept) <= 5
    assert all(e["package"] >= "bad-40" for e in kept), "the newest are the ones kept"
    too_big = next(e for e in entries if e["package"] == "bad-25.zip")
    assert too_big["kept"] is False and too_big["bytes"] == 4_000_000
    bytes_kept = pipeline.quarantine.bytes_kept()
    packages_bytes = sum(p.stat().st_size for p in pipeline.repo.quarantine_dir.rglob("*")
                         if p.is_file() and p.name != REASON_FILE)
    assert packages_bytes <= 3_000_000
    assert bytes_kept < 3_000_000 + 50 * 1000  # and the records: a few hundred bytes each
    # The oldest package's bytes are gone, its reason is not: dropped again, it is recognised.
    (inbox / "again.zip").write_bytes(first)
    await pipeline.process(inbox / "again.zip", source="inbox")
    assert last(events, "duplicate") is not None
    assert not (inbox / "again.zip").exists()
    dropped = sum(e["bytes"] for e in entries)
    print(f"\nquarantine after 50 bad packages ({dropped} bytes in all): {bytes_kept} bytes on disk, "
          f"{len(kept)} packages kept, {len(entries)} reasons")


def test_reason_records_are_bounded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.updates import quarantine as q

    monkeypatch.setattr(q, "MAX_RECORDS", 10)
    quarantine = q.Quarantine(tmp_path / "quarantine", keep=2, max_bytes=10_000)
    for i in range(15):
        bad = tmp_path / f"p{i:02}.zip"
        bad.write_bytes(b"x" * 100)
        quarantine.add(bad, "bad", f"{i:064x}")
    names = [e["package"] for e in quarantine.entries()]
    assert names == [f"p{i:02}.zip" for i in range(5, 15)]
    assert MAX_RECORDS == 1000


# -- ENOSPC injected at each write ------------------------------------------------------------------


@contextlib.contextmanager
def enospc_on_writes_under(folder: Path, after_bytes: int = 0, code: int = errno.ENOSPC) -> Iterator[None]:
    """Every file opened for writing under ``folder`` fails with ``code`` (ENOSPC) once ``after_bytes``
    are in."""
    real_open = pathlib.Path.open

    class Full:
        def __init__(self, f: Any) -> None:
            self._f, self._n = f, 0

        def write(self, data: bytes) -> int:
            self._n += len(data)
            if self._n > after_bytes:
                raise OSError(code, os.strerror(code))
            return int(self._f.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    def fake_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(self, mode, *args, **kwargs)
        if any(c in mode for c in "wxa") and str(self).startswith(str(folder)):
            return Full(f)
        return f

    pathlib.Path.open = fake_open  # type: ignore[method-assign]
    try:
        yield
    finally:
        pathlib.Path.open = real_open  # type: ignore[method-assign]


def _fail_install_record(*_: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


INJECTIONS = ["free-space-check", "unpack-mid-write", "folder-copy", "install-record", "flip-symlink",
              "quota-exceeded"]


@pytest.fixture
async def serving(settings: Settings, engine: Engine, events: EventBus) -> AsyncIterator[Pipeline]:
    pipeline = await started(settings, engine, events)
    v1 = await pipeline.process(write_zip(pipeline.repo.inbox_dir / "v1.zip", ssd_files("tiny-ssd", "1")), "inbox")
    assert v1 is not None
    yield pipeline
    await pipeline.close()


@pytest.mark.parametrize("where", INJECTIONS)
async def test_a_full_disk_keeps_the_old_model_and_retries_the_package(
    serving: Pipeline, where: str, monkeypatch: pytest.MonkeyPatch, photo: bytes, wait_until: Any,
) -> None:
    pipeline, repo, events = serving, serving.repo, serving.events
    files = ssd_files("tiny-ssd", "2", extra_files={"weights.bin": os.urandom(1_500_000)})
    package = (write_folder(repo.inbox_dir / "v2", files) if where == "folder-copy"
               else write_zip(repo.inbox_dir / "v2.zip", files))
    pipeline.space_wait.interval = 3600.0  # no retry until the disk is "freed" below
    with contextlib.ExitStack() as stack:
        if where == "free-space-check":
            usage = shutil.disk_usage(repo.data_dir)
            monkeypatch.setattr(supervisor.diskspace.shutil, "disk_usage",
                                lambda _p: usage._replace(free=1_000_000))
        elif where == "unpack-mid-write":
            stack.enter_context(enospc_on_writes_under(repo.staging_dir, after_bytes=300_000))
        elif where == "folder-copy":
            real = shutil.copyfile

            def copyfile(src: Any, dst: Any, **kw: Any) -> Any:
                if str(dst).startswith(str(repo.staging_dir)) and str(src).endswith("weights.bin"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(src, dst, **kw)

            monkeypatch.setattr(shutil, "copyfile", copyfile)
        elif where == "install-record":
            monkeypatch.setattr(repository_module, "write_durably", _fail_install_record)
        elif where == "flip-symlink":
            real_symlink = os.symlink

            def symlink(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
                if "current" in str(dst):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_symlink(src, dst, *a, **kw)

            monkeypatch.setattr(repository_module.os, "symlink", symlink)
        elif where == "quota-exceeded":
            # A quota (EDQUOT) is the same condition as a full disk.
            stack.enter_context(enospc_on_writes_under(repo.staging_dir, after_bytes=0, code=errno.EDQUOT))
        assert await pipeline.process(package, source="inbox") is None
        monkeypatch.undo()
    failed = last(events, "failed")
    assert failed is not None and failed.package == package.name, states(events)
    assert "disk is full" in (failed.reason or "") and "not the package's fault" in (failed.reason or "")
    # The old model serves, from a consistent repository; nothing quarantined or remembered.
    assert pipeline.engine.active is not None and pipeline.engine.active.info.version == "1"
    result = await pipeline.engine.detect(photo, None, None, None)
    assert result.model.version == "1"
    assert repo.current() is not None and repo.current().version == "1"  # type: ignore[union-attr]
    assert [p.name for p in repo.staging_dir.iterdir()] == [], "staging cleaned"
    assert repo.repair() == [], "nothing half-done left for the start-up repair"
    assert pipeline.quarantine.entries() == [] and last(events, "rejected") is None
    assert package.exists(), "the package stays where it can be retried"
    assert package in pipeline.space_wait.waiting
    # Space returns: the package is tried again and installs.
    pipeline.space_wait.interval = 0.05
    await pipeline.space_wait.close()
    pipeline.space_wait.add(package, "inbox", 0)
    await wait_until(lambda: pipeline.engine.active is not None and pipeline.engine.active.info.version == "2"
                     and not package.exists(), within=15, what="v2 active once space returned")
    assert not package.exists() and repo.current().version == "2"  # type: ignore[union-attr]


async def test_a_bad_package_on_a_full_disk_is_left_in_place_when_its_reason_cannot_be_written(
    serving: Pipeline,
) -> None:
    repo = serving.repo
    bad = repo.inbox_dir / "bad.zip"
    bad.write_bytes(b"not a zip at all" * 100)
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self: Path, *a: Any, **kw: Any) -> None:
        if str(self).startswith(str(repo.quarantine_dir) + os.sep):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_mkdir(self, *a, **kw)

    pathlib.Path.mkdir = mkdir  # type: ignore[method-assign]
    try:
        assert await serving.process(bad, source="inbox") is None
    finally:
        pathlib.Path.mkdir = real_mkdir  # type: ignore[method-assign]
    assert bad.exists() and serving.quarantine.entries() == []
    assert last(serving.events, "rejected") is not None  # still said, in /models' events and the twin
    assert serving.engine.active is not None and serving.engine.active.info.version == "1"


# -- a real small filesystem ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 60 MB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("check_first", [True, False], ids=["checked-first", "enospc-mid-write"])
async def test_on_a_60mb_tmpfs_a_35mb_package_waits_for_space_and_then_installs(
    small_disk: Path, settings: Settings, engine: Engine, events: EventBus, photo: bytes, wait_until: Any,
    monkeypatch: pytest.MonkeyPatch, check_first: bool,
) -> None:
    pipeline = await started(settings.replace(data_dir=small_disk / "data"), engine, events)
    try:
        repo = pipeline.repo
        v1 = await pipeline.process(write_zip(repo.inbox_dir / "v1.zip", ssd_files("tiny-ssd", "1")), "inbox")
        assert v1 is not None
        filler = small_disk / "filler.bin"
        package = repo.inbox_dir / "big.zip"
        # 35 MB of weights, stored (random bytes do not deflate): the zip alone is 35 MB of the 60.
        write_zip(package, ssd_files("tiny-ssd", "2", extra_files={"weights.bin": os.urandom(35_000_000)}))
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 12_000_000))  # 12 MB left
        pipeline.space_wait.interval = 0.1
        if not check_first:  # the write itself meets the full disk
            monkeypatch.setattr("supervisor.package.archive.ensure_room", lambda *a: None)
        assert await pipeline.process(package, source="inbox") is None
        failed = last(events, "failed")
        assert failed is not None and "disk is full" in (failed.reason or ""), states(events)
        if check_first:
            assert "not enough disk space to unpack the package" in (failed.reason or "")
        assert package.exists() and pipeline.quarantine.entries() == []
        assert [p.name for p in repo.staging_dir.iterdir()] == []
        assert (await pipeline.engine.detect(photo, None, None, None)).model.version == "1"
        monkeypatch.undo()
        await pipeline.process(package, source="inbox")  # dropped again while still full: still waiting
        assert pipeline.quarantine.entries() == [] and package.exists()
        # Space returns: 35 MB of package and 35 MB unpacked never fit in 60 MB; the disk grows.
        filler.unlink()
        await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
        await wait_until(lambda: pipeline.engine.active is not None and pipeline.engine.active.info.version == "2"
                         and not package.exists(), within=30, what="the big package installed once space returned")
        assert not package.exists() and pipeline.quarantine.entries() == []
        assert (await pipeline.engine.detect(photo, None, None, None)).model.version == "2"
    finally:
        await pipeline.close()
