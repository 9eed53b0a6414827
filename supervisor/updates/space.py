"""Packages that met a full disk wait here for space, then go through the pipeline again.

A full disk is the device's condition (diskspace.py): the package stays where it was (inbox/ or
staging/) and is tried again once the data dir's filesystem has the room its install needs. The
watcher would not hand it over again while it is unchanged; a restart or dropping it again would.
One task, alive only while something waits; cancelled and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from supervisor.diskspace import free_bytes

__all__ = ["SpaceWait"]

log = structlog.get_logger(__name__)


class SpaceWait:
    """Packages waiting for disk space: (path) -> (source, bytes needed)."""

    # Seconds between looks at the free space while something waits.
    interval = 10.0

    def __init__(self, data_dir: Path, process: Callable[[Path, str], Awaitable[object]]) -> None:
        self.data_dir = data_dir
        self._process = process
        self.waiting: dict[Path, tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, package: Path, source: str, needed: int) -> None:
        self.waiting[package] = (source, needed)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="disk-space-wait")

    async def _run(self) -> None:
        while self.waiting:
            await asyncio.sleep(self.interval)
            free = await asyncio.to_thread(free_bytes, self.data_dir)
            for package, (source, needed) in list(self.waiting.items()):
                if not await asyncio.to_thread(os.path.lexists, package):
                    self.waiting.pop(package, None)  # taken away, or installed meanwhile
                    continue
                if free < needed:
                    continue
                self.waiting.pop(package, None)
                log.info("package_retry_space_returned", package=package.name, free=free, needed=needed)
                try:
                    await self._process(package, source)
                except Exception:
                    log.exception("package_retry_failed", package=package.name)
                free = await asyncio.to_thread(free_bytes, self.data_dir)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
