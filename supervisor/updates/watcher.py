"""The drop folders: hand each complete package in ``inbox/`` and ``staging/`` to the pipeline.

A copy in progress is waited for, never rejected. Every top-level entry of a watched folder is a
candidate with its own settle timer, restarted by any change under it. It is handed over when:

- a file: its size and mtime stayed the same for ``settle_seconds`` and, when it starts like a zip,
  the central directory (written last) is readable;
- a folder: nothing in it changed for ``settle_seconds`` and no temp-named file lies in it;
- a download the twin committed to ``staging/`` (``partfile.commit``): at once. It was renamed
  into place whole, after its ``.intent.json``, which records its size; a file of that size beside
  such an intent needs no settle wait. Anything else in staging (no intent, an intent naming
  another size) settles like a dropped file: an odd case costs the settle wait, nothing more.

A zip that stays incomplete (a copy that stopped half-way) is handed over anyway after
``incomplete_timeout``, and the pipeline quarantines it.

A sidecar (``x.zip.sha256``, ``.md5``, ``.intent.json``) restarts its package's timer, so one that
arrives just after the package is still read. A checksum sidecar in ``inbox/`` without its package
is handed over (as itself) after ``incomplete_timeout``, unless its package turns up: the pipeline
says what became of it (``late_sidecar.py``) instead of leaving it there unexplained. Temp and editor
names are never candidates, nor are dot-names (the repository builds versions in ``staging/.tmp-*``).

Packages present at start are picked up too. Notifications come from the OS (inotify) through
``watchfiles`` (checked in the dev container, ext4: events arrive ~15 ms after a write;
polling took ~120 ms at a 100 ms delay). A slow rescan (every ``rescan_seconds`` without a
notification) catches what a filesystem without notifications (a network share) never reports;
``WATCHFILES_FORCE_POLLING=1`` switches watchfiles to polling outright.
Packages are processed one after the other; a package the pipeline leaves in place is not retried
until it changes (the pipeline quarantines bad packages, so that should not happen).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import watchfiles

from supervisor.formats import CHECKSUM_SUFFIXES, INTENT_SUFFIX, SIDECAR_SUFFIXES
from supervisor.package.archive import is_complete_zip
from supervisor.package.paths import MAX_DEPTH, MAX_ENTRIES

__all__ = ["PackageWatcher", "is_candidate_name", "sidecar_owner"]

log = structlog.get_logger(__name__)

# Names copy tools, browsers and editors give to files still being written.
_TEMP_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".opdownload", ".tmp", ".temp", ".swp", "~")
_TEMP_PREFIXES = ("~$", ".~lock", ".tmp-")
# rsync writes ".<name>.<6 random chars>" and renames it when done.
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")
# Litter from the operating system of the laptop that filled the USB stick.
_OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "system volume information", "$recycle.bin", "__macosx"})


class _Processor(Protocol):
    async def process(self, package: Path, source: str) -> object: ...


def _is_temp_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_TEMP_SUFFIXES) or lower.startswith(_TEMP_PREFIXES) or bool(_RSYNC_TEMP.match(name))


def is_candidate_name(name: str) -> bool:
    """Whether a top-level entry of a drop folder can be a package (by its name alone)."""
    lower = name.lower()
    return not (
        name.startswith(".")
        or _is_temp_name(name)
        or lower.endswith(SIDECAR_SUFFIXES)
        or lower in _OS_LITTER
    )


def sidecar_owner(name: str) -> str | None:
    """``x.zip.sha256`` -> ``x.zip``: the package a sidecar belongs to."""
    lower = name.lower()
    for suffix in SIDECAR_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


@dataclass(frozen=True)
class _Snapshot:
    """What a candidate looks like now; equal snapshots a settle period apart mean 'unchanged'."""

    state: tuple[object, ...]
    complete: bool  # False: a zip without its central directory, or a folder with temp files
    size: int | None = field(default=None, compare=False)  # bytes so far (a folder: its files')


@dataclass
class _Waiting:
    """A candidate not handed over yet, for ``pending()``: since when, how big so far."""

    source: str
    since: float
    size: int | None = None
    incomplete: bool = False


def _snapshot(path: Path) -> _Snapshot | None:
    """Blocking (stats, and a zip's central directory): run it in a thread."""
    try:
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            return _folder_snapshot(path)
        state: tuple[object, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return _Snapshot(state, True, st.st_size)  # the pipeline says what is wrong with it
        with path.open("rb") as f:
            head = f.read(4)
        # Zip writers put the central directory last: until it is there, the copy is not done.
        # A file not starting like a zip gets no such grace; the pipeline rejects it if bad.
        zip_like = head in (b"PK\x03\x04", b"PK\x05\x06")
        return _Snapshot(state, not zip_like or is_complete_zip(path), st.st_size)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable right now (permissions being set by the copier?)
        return _Snapshot(("error", str(exc)), False)
    except Exception as exc:  # a bug of ours or an odd file: the pipeline says what is wrong with it
        return _Snapshot(("unreadable", type(exc).__name__), True)


def _folder_snapshot(path: Path) -> _Snapshot | None:
    """Every entry under a folder package with its size and mtime. Iterative and capped: a tree
    too deep or too big for a package is reported as it is (complete, so the pipeline gets it and
    quarantines it with the reason), never as a RecursionError in a settle task."""
    entries: list[tuple[str, int, int]] = []
    complete = True
    stack: list[tuple[str, int]] = [(str(path), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                listing = list(it)
        except FileNotFoundError:
            if folder == str(path):
                return None
            complete = False  # changing under us
            continue
        except OSError:
            complete = False
            continue
        for entry in listing:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                complete = False
                continue
            entries.append((os.path.relpath(entry.path, path), st.st_size, st.st_mtime_ns))
            if len(entries) > MAX_ENTRIES or depth + 1 >= MAX_DEPTH:
                return _Snapshot(("oversized", len(entries), depth), True)
            if stat.S_ISDIR(st.st_mode):
                stack.append((entry.path, depth + 1))
            elif _is_temp_name(entry.name):
                complete = False
    if not os.path.isdir(path):
        return None
    entries.sort()
    return _Snapshot(("dir", *entries), complete, sum(size for _, size, _ in entries))


def _is_committed(path: Path, snap: _Snapshot) -> bool:
    """Whether ``path``, as ``snap`` saw it, is a download ``partfile.commit`` renamed into place:
    its intent (renamed in first) records the size the file has. Blocking (a stat and a small read)."""
    try:
        raw = json.loads(path.with_name(path.name + INTENT_SUFFIX).read_text("utf-8"))
        st = path.lstat()
    except (OSError, ValueError):
        return False
    size = raw.get("size") if isinstance(raw, dict) else None
    return (
        snap.complete
        and stat.S_ISREG(st.st_mode)
        and type(size) is int
        and snap.state == (st.st_ino, size, st.st_mtime_ns)
    )


def _list_candidates(folder: Path, orphans: bool = False) -> list[str]:
    """The candidate names in ``folder``; with ``orphans``, also checksum sidecars without their package."""
    try:
        names = set(os.listdir(folder))
    except FileNotFoundError:
        return []
    found = {name for name in names if is_candidate_name(name)}
    if orphans:
        found |= {name for name in names if _is_orphan_checksum(folder, name, names)}
    return sorted(found)


def _is_orphan_checksum(folder: Path, name: str, names: set[str] | None = None) -> bool:
    """A ``x.zip.sha256``/``.md5`` with no ``x.zip`` beside it (late_sidecar.py says what it means)."""
    owner = sidecar_owner(name)
    if owner is None or not name.lower().endswith(CHECKSUM_SUFFIXES) or not is_candidate_name(owner):
        return False
    return owner not in names if names is not None else not os.path.lexists(folder / owner)


class PackageWatcher:
    """Watches ``inbox`` and ``staging``; feeds complete packages to ``pipeline.process``."""

    def __init__(
        self,
        pipeline: _Processor,
        inbox: Path,
        staging: Path,
        settle_seconds: float,
        *,
        incomplete_timeout: float = 120.0,
        rescan_seconds: float = 15.0,
        force_polling: bool | None = None,
    ) -> None:
        """``incomplete_timeout``: how long a stable but incomplete zip (a copy that stopped
        half-way) is waited for before the pipeline gets it anyway and quarantines it.
        ``rescan_seconds``: the safety-net rescan when no notification arrived meanwhile.
        The service passes the settings of the same names (``incomplete_timeout_seconds``).
        ``force_polling``: None lets watchfiles decide (``WATCHFILES_FORCE_POLLING``)."""
        self.pipeline = pipeline
        # Absolute, not resolved: inotify reports absolute paths under the path as given (through
        # symlinks), polling reports them as given; _notice makes both absolute to compare.
        self.roots = {Path(os.path.abspath(inbox)): "inbox", Path(os.path.abspath(staging)): "staging"}
        self.settle_seconds = settle_seconds
        self.incomplete_timeout = incomplete_timeout
        self.rescan_seconds = rescan_seconds
        self.force_polling = force_polling
        self._timers: dict[Path, asyncio.Task[None]] = {}
        self._ready: asyncio.Queue[tuple[Path, str, _Snapshot]] = asyncio.Queue()
        # Candidates handed over but still there, as they were: not handed over again unchanged.
        self._done: dict[Path, _Snapshot] = {}
        # Candidates being waited for (settling, or a copy not finished), since they were first seen.
        self._waiting: dict[Path, _Waiting] = {}

    def pending(self) -> list[dict[str, Any]]:
        """Packages waiting to settle or for the rest of their copy: name, folder, state ("settling",
        "incomplete"), since when (epoch seconds) and the bytes there so far."""
        return [
            {"package": path.name, "source": w.source, "state": "incomplete" if w.incomplete else "settling",
             "since": w.since, "bytes": w.size}
            for path, w in sorted(self._waiting.items(), key=lambda item: item[1].since)
        ]

    def _note_waiting(self, path: Path, source: str, snap: _Snapshot) -> None:
        waiting = self._waiting.setdefault(path, _Waiting(source, time.time()))
        waiting.size, waiting.incomplete = snap.size, not snap.complete

    async def run(self) -> None:
        """Watch until cancelled. Packages already in the folders are picked up first."""
        for root in self.roots:
            await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        log.info("watcher_started", folders=[str(r) for r in self.roots], settle_s=self.settle_seconds,
                 incomplete_timeout_s=self.incomplete_timeout, rescan_s=self.rescan_seconds)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(), name="watcher-process")
                tg.create_task(self._watch(), name="watcher-notify")
        finally:
            for timer in self._timers.values():
                timer.cancel()
            if self._timers:
                await asyncio.gather(*self._timers.values(), return_exceptions=True)
            self._timers.clear()
            self._waiting.clear()

    # -- noticing ------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        await self._rescan()
        async for changes in watchfiles.awatch(
            *self.roots,
            watch_filter=None,
            debounce=400,
            step=50,
            rust_timeout=int(self.rescan_seconds * 1000),
            yield_on_timeout=True,
            force_polling=self.force_polling,
            poll_delay_ms=250,
        ):
            if not changes:  # quiet for rescan_seconds
                await self._rescan()
                continue
            for _change, raw in changes:
                self._notice(Path(os.path.abspath(raw)))

    async def _rescan(self) -> None:
        for root, source in self.roots.items():
            for name in await asyncio.to_thread(_list_candidates, root, source == "inbox"):
                path = root / name
                if path not in self._timers:
                    self._schedule(path, source)

    def _notice(self, changed: Path) -> None:
        """A change somewhere under a watched folder: restart the timer of the candidate it touches."""
        for root, source in self.roots.items():
            try:
                rel = changed.relative_to(root)
            except ValueError:
                continue
            if not rel.parts:
                return  # the folder itself
            top = rel.parts[0]
            if len(rel.parts) == 1 and (owner := sidecar_owner(top)) is not None:
                if source == "inbox" and _is_orphan_checksum(root, top):
                    self._schedule(root / top, source)  # its package is gone (or never came)
                    return
                top = owner
            if is_candidate_name(top):
                self._schedule(root / top, source)
            return

    def _schedule(self, path: Path, source: str) -> None:
        old = self._timers.pop(path, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._settle(path, source), name=f"settle:{path.name}")
        self._timers[path] = task
        task.add_done_callback(lambda t: self._timers.pop(path, None) if self._timers.get(path) is t else None)

    async def _settle(self, path: Path, source: str) -> None:
        """Wait until ``path`` has been quiet for a settle period and is complete; then queue it.
        A download committed to staging is queued at once. Whatever goes wrong while looking at
        it, the package is handed over (the pipeline quarantines it with a reason): an exception
        here would otherwise die unseen in this task and leave the package lying there."""
        try:
            await self._wait_until_settled(path, source)
        except asyncio.CancelledError:
            raise  # a newer timer for the same path takes over (and keeps its waiting entry)
        except Exception as exc:
            self._waiting.pop(path, None)
            log.warning("package_settle_failed", package=path.name, source=source, error=f"{type(exc).__name__}")
            snap = await asyncio.to_thread(_snapshot, path)
            if snap is not None:
                self._ready.put_nowait((path, source, snap))

    async def _wait_until_settled(self, path: Path, source: str) -> None:
        before = await asyncio.to_thread(_snapshot, path)
        if before is None or self._done.get(path) == before:
            self._waiting.pop(path, None)
            if before is None:
                self._done.pop(path, None)
            return
        if source == "staging" and await asyncio.to_thread(_is_committed, path, before):
            self._waiting.pop(path, None)
            self._ready.put_nowait((path, source, before))
            return
        if not is_candidate_name(path.name):  # only an orphan checksum sidecar is scheduled so
            await self._hold_orphan(path, source)
            return
        self._note_waiting(path, source, before)
        incomplete_since: float | None = None
        while True:
            await asyncio.sleep(self.settle_seconds)
            now = await asyncio.to_thread(_snapshot, path)
            if now is None:
                self._waiting.pop(path, None)
                return
            self._note_waiting(path, source, now)
            if now != before:
                before = now
                continue
            if not now.complete:
                if incomplete_since is None:
                    incomplete_since = time.monotonic()
                    log.info("package_incomplete_waiting", package=path.name, source=source)
                if time.monotonic() - incomplete_since < self.incomplete_timeout:
                    continue
                log.warning("package_incomplete_giving_up", package=path.name, source=source,
                            waited_s=round(time.monotonic() - incomplete_since, 1))
            self._waiting.pop(path, None)
            self._ready.put_nowait((path, source, now))
            return

    async def _hold_orphan(self, path: Path, source: str) -> None:
        """A checksum sidecar without its package: its package may still be on its way (under a temp
        name), so it is reported only after ``incomplete_timeout`` (late_sidecar.py says what). A
        package that appears meanwhile takes it along (its own timer runs)."""
        waited = 0.0
        while waited < self.incomplete_timeout:
            await asyncio.sleep(self.settle_seconds)
            waited += self.settle_seconds
            if not await asyncio.to_thread(_is_orphan_checksum, path.parent, path.name):
                return  # gone, or its package arrived
        now = await asyncio.to_thread(_snapshot, path)
        if now is not None:
            log.info("sidecar_without_package", sidecar=path.name, source=source, waited_s=round(waited, 1))
            self._ready.put_nowait((path, source, now))

    # -- handing over ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            path, source, settled = await self._ready.get()
            now = await asyncio.to_thread(_snapshot, path)
            if now is None or self._done.get(path) == now:
                continue
            if now != settled:  # changed while queued (a late sidecar, a second copy)
                self._schedule(path, source)
                continue
            log.info("package_complete", package=path.name, source=source)
            try:
                await self.pipeline.process(path, source=source)
            except Exception:
                log.exception("package_processing_crashed", package=path.name, source=source)
            # Left exactly as it was handed over: not handed over again until it changes. (Another
            # file under the same name, dropped meanwhile, is a new candidate: its own event
            # already restarted its timer.)
            if await asyncio.to_thread(_snapshot, path) == now:
                self._done[path] = now
