"""Quarantine: packages that failed, kept with the reason, never retried; bounded on disk.

Each entry is ``quarantine/<time>-<package name>/`` holding a ``reason.json`` (reason, SHA-256, when,
the package's size and whether its bytes are kept) and, while they are kept, the package as received
with its sidecars. The SHA-256 index lets the pipeline recognise the same bad package dropped again
without reprocessing it.

Bounded (issue 16): the bytes of at most ``keep`` packages and ``max_bytes`` together are kept, the
newest; older entries lose their package but keep their reason record (a line of JSON), so a bad
package dropped again is still recognised. Records themselves go beyond ``MAX_RECORDS``. A package
is moved in by a rename only: a quarantine copy never costs disk space (a package on another
filesystem, or larger than ``max_bytes`` on its own, is deleted and only its reason is kept).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import structlog

from supervisor.formats import REASON_FILE
from supervisor.fsutil import remove_tree
from supervisor.package.paths import safe_name

__all__ = ["MAX_RECORDS", "REASON_FILE", "Quarantine", "tree_size"]

log = structlog.get_logger(__name__)

# Reason records kept (a few hundred bytes each); the oldest beyond go whole.
MAX_RECORDS = 1000


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder), without following symlinks. Iterative."""
    total = 0
    stack = [path]
    while stack:
        item = stack.pop()
        try:
            st = item.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(item.iterdir())
            except OSError:
                continue
        else:
            total += st.st_size
    return total


class Quarantine:
    def __init__(self, folder: Path, keep: int = 20, max_bytes: int = 200_000_000) -> None:
        self.folder = folder
        self.keep = keep
        self.max_bytes = max_bytes

    def add(self, package: Path, reason: str, sha256: str | None, extras: list[Path] | None = None) -> Path | None:
        """Move ``package`` (and its sidecars) into a new quarantine entry with the reason, then trim
        the quarantine to its bounds. Returns the entry, or None when not even the reason could be
        written (a full disk): the package is then left where it is and the log says why."""
        size = tree_size(package)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        entry = self.folder / f"{stamp}-{safe_name(package.name)}"
        n = 1
        while entry.exists():
            n += 1
            entry = self.folder / f"{stamp}-{safe_name(package.name)}-{n}"
        record: dict[str, Any] = {"package": package.name, "reason": reason, "sha256": sha256, "at": time.time(),
                                  "bytes": size, "kept": size <= self.max_bytes}
        try:
            entry.mkdir(parents=True)
            (entry / REASON_FILE).write_text(json.dumps(record, indent=2), "utf-8")
        except OSError as exc:
            log.error("quarantine_unwritable", package=package.name, reason=reason, error=str(exc))
            remove_tree(entry)
            return None
        for item in [package, *(extras or [])]:
            if not (item.exists() or item.is_symlink()):
                continue
            if item is package and not record["kept"]:
                remove_tree(item)  # larger than the whole quarantine may hold: its reason is what is kept
                continue
            try:
                os.rename(item, entry / item.name)  # a rename: never a copy that costs space
            except OSError as exc:  # another filesystem (EXDEV), or gone meanwhile
                log.info("quarantine_not_moved", package=item.name, error=str(exc))
                remove_tree(item)
                if item is package:
                    self._update(entry, kept=False)
        log.warning("package_quarantined", package=package.name, reason=reason, entry=entry.name,
                    kept=record["kept"])
        self.trim()
        return entry

    def _update(self, entry: Path, **changes: Any) -> None:
        path = entry / REASON_FILE
        try:
            record = json.loads(path.read_text("utf-8"))
            record.update(changes)
            tmp = path.with_name(f".{REASON_FILE}.tmp")
            tmp.write_text(json.dumps(record, indent=2), "utf-8")
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            log.warning("quarantine_record_not_updated", entry=entry.name, error=str(exc))

    def _listing(self) -> list[tuple[Path, dict[str, Any]]]:
        """Entries with their records, oldest first."""
        found = []
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return []
        for entry in entries:
            try:
                record = json.loads((entry / REASON_FILE).read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                found.append((entry, record))
        found.sort(key=lambda e: (float(e[1].get("at") or 0.0), e[0].name))
        return found

    def trim(self) -> None:
        """Keep the bytes of the newest ``keep`` packages within ``max_bytes``; drop the bytes of older
        entries (their records stay), and whole entries beyond ``MAX_RECORDS``."""
        listing = self._listing()
        kept, total = 0, 0
        for index, (entry, record) in enumerate(reversed(listing)):
            if index >= MAX_RECORDS:
                remove_tree(entry)
                continue
            if not record.get("kept", True):
                continue
            size = tree_size(entry) - tree_size(entry / REASON_FILE)
            if kept < self.keep and total + size <= self.max_bytes:
                kept, total = kept + 1, total + size
                continue
            for item in entry.iterdir():
                if item.name != REASON_FILE:
                    remove_tree(item)
            self._update(entry, kept=False, dropped_at=time.time())
            log.info("quarantine_bytes_dropped", entry=entry.name, bytes=size)

    def entries(self) -> list[dict[str, Any]]:
        return [{**record, "entry": entry.name} for entry, record in self._listing()]

    def seen(self, sha256: str) -> bool:
        return any(e.get("sha256") == sha256 for e in self.entries())

    def bytes_kept(self) -> int:
        return tree_size(self.folder)
