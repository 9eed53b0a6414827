"""Quarantine: packages that failed, kept with the reason, never retried.

Each entry is ``quarantine/<time>-<package name>/`` holding the package as received and a
``reason.json`` (reason, SHA-256, when). The SHA-256 index lets the pipeline recognise the same
bad package dropped again without reprocessing it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import structlog

from supervisor.formats import REASON_FILE
from supervisor.package.paths import safe_name

__all__ = ["Quarantine"]

log = structlog.get_logger(__name__)



class Quarantine:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, package: Path, reason: str, sha256: str | None, extras: list[Path] | None = None) -> Path:
        """Move ``package`` (and its sidecars) into a new quarantine entry with the reason."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        entry = self.folder / f"{stamp}-{safe_name(package.name)}"
        n = 1
        while entry.exists():
            n += 1
            entry = self.folder / f"{stamp}-{safe_name(package.name)}-{n}"
        entry.mkdir(parents=True)
        record = {"package": package.name, "reason": reason, "sha256": sha256, "at": time.time()}
        (entry / REASON_FILE).write_text(json.dumps(record, indent=2), "utf-8")
        for item in [package, *(extras or [])]:
            if item.exists() or item.is_symlink():
                shutil.move(str(item), str(entry / item.name))
        log.warning("package_quarantined", package=package.name, reason=reason, entry=entry.name)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        found = []
        if not self.folder.is_dir():
            return []
        for entry in sorted(self.folder.iterdir()):
            try:
                record = json.loads((entry / REASON_FILE).read_text("utf-8"))
            except (OSError, ValueError):
                continue
            found.append({**record, "entry": entry.name})
        return found

    def seen(self, sha256: str) -> bool:
        return any(e.get("sha256") == sha256 for e in self.entries())
