"""The model repository on disk: the single source of truth.

Layout under the data dir::

    models/<name>/<version>/   an installed package (files + .edgeloader.json, written last)
    current -> models/<name>/<version>    the active version (a relative symlink)
    previous -> models/<name>/<version>   the version active before it (rollback target)
    inbox/  staging/  quarantine/

Every change is made so that a crash at any moment leaves a complete state: a version folder is
built in staging/ (same filesystem) and renamed into place in one step, and a symlink is replaced
by writing a new one beside it and ``os.replace``-ing it over the old one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from supervisor.formats import INSTALL_RECORD, TMP_PREFIX
from supervisor.fsutil import fsync_dir, fsync_tree, remove_tree, write_durably
from supervisor.package.paths import is_safe_component, member_path

__all__ = ["INSTALL_RECORD", "InstalledVersion", "Repository"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class InstalledVersion:
    name: str
    version: str
    path: Path
    record: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def installed_at(self) -> float:
        return float(self.record.get("installed_at", 0.0))

    @property
    def package_sha256(self) -> str | None:
        return self.record.get("package_sha256")

    def check_record(self) -> None:
        """The install record names files inside this version folder, or the version is refused
        at load (PackageError): a record is data on disk, not trusted to point anywhere."""
        for key in ("model_file", "labels_file"):
            value = self.record.get(key)
            if value is not None:
                member_path(self.path, value, f"the install record's {key!r}")


class Repository:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.models_dir = data_dir / "models"
        self.current_link = data_dir / "current"
        self.previous_link = data_dir / "previous"
        self.inbox_dir = data_dir / "inbox"
        self.staging_dir = data_dir / "staging"
        self.quarantine_dir = data_dir / "quarantine"

    def ensure_layout(self) -> None:
        for d in (self.models_dir, self.inbox_dir, self.staging_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def versions(self) -> list[InstalledVersion]:
        """Every complete installed version, oldest install first."""
        found = []
        if not self.models_dir.is_dir():
            return []
        for name_dir in _subdirs(self.models_dir):
            for version_dir in _subdirs(name_dir):
                record = self._read_record(version_dir)
                if record is not None:
                    found.append(InstalledVersion(name_dir.name, version_dir.name, version_dir, record))
        return sorted(found, key=lambda v: v.installed_at)

    def get(self, name: str, version: str) -> InstalledVersion | None:
        """The stored version, or None. ``name`` and ``version`` come from routes and symlinks:
        each must be one safe path component (no '..', no slash, no leading dot, no encoding
        trick), and the folder must lie under models/ once resolved."""
        if not (is_safe_component(name) and is_safe_component(version)):
            return None
        path = self.models_dir / name / version
        try:
            inside = os.path.commonpath([path.resolve(), self.models_dir.resolve()]) == str(self.models_dir.resolve())
        except (OSError, ValueError):
            return None
        if not inside or path.is_symlink() or path.parent.is_symlink():
            return None
        record = self._read_record(path)
        return InstalledVersion(name, version, path, record) if record is not None else None

    def find_by_package_sha256(self, sha256: str) -> InstalledVersion | None:
        return next((v for v in self.versions() if v.package_sha256 == sha256), None)

    def _link_target(self, link: Path) -> InstalledVersion | None:
        try:
            target = os.readlink(link)
        except OSError:
            return None
        parts = Path(target).parts
        if len(parts) != 3 or parts[0] != "models":
            return None
        return self.get(parts[1], parts[2])

    def current(self) -> InstalledVersion | None:
        return self._link_target(self.current_link)

    def previous(self) -> InstalledVersion | None:
        return self._link_target(self.previous_link)

    @staticmethod
    def _read_record(version_dir: Path) -> dict[str, Any] | None:
        try:
            record = json.loads((version_dir / INSTALL_RECORD).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # -- writing ---------------------------------------------------------------------------------

    def new_workdir(self) -> Path:
        """A fresh folder in staging/ (same filesystem as models/) to build a version in."""
        path = self.staging_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    def install(self, workdir: Path, name: str, version: str, record: dict[str, Any]) -> InstalledVersion:
        """Move a complete package folder into models/<name>/<version>/ in one rename.

        The install record is written inside the workdir first, and the workdir's files and folders
        are fsynced before the rename, so a version folder that exists in models/ is always complete,
        power cuts included; the rename itself is made durable before this returns."""
        target = self.models_dir / name / version
        if target.exists():
            raise FileExistsError(f"{name} {version} is already installed")
        record = {**record, "name": name, "version": version, "installed_at": time.time()}
        write_durably(workdir / INSTALL_RECORD, json.dumps(record, indent=2))
        fsync_tree(workdir)
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.models_dir)
        os.rename(workdir, target)
        fsync_dir(target.parent)
        return InstalledVersion(name, version, target, record)

    def _point(self, link: Path, version: InstalledVersion) -> None:
        tmp = link.with_name(f"{link.name}{TMP_PREFIX}{uuid.uuid4().hex[:8]}")
        os.symlink(os.path.join("models", version.name, version.version), tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def flip(self, version: InstalledVersion) -> None:
        """Make ``version`` current (atomically); the old current becomes previous."""
        old = self.current()
        if old is not None and old.key != version.key:
            self._point(self.previous_link, old)
        self._point(self.current_link, version)

    def remove(self, version: InstalledVersion) -> None:
        # Rename first so that a crash mid-delete never leaves a half-deleted version in models/.
        doomed = self.staging_dir / f"{TMP_PREFIX}del-{uuid.uuid4().hex[:8]}"
        os.rename(version.path, doomed)
        remove_tree(doomed)
        try:
            version.path.parent.rmdir()
        except OSError:
            pass

    def prune(self, keep: int) -> list[InstalledVersion]:
        """Keep the newest ``keep`` versions of each name, and the current and previous ones
        whatever their age. (Counting an old current against ``keep`` would delete the newest
        versions instead, the one just stored with ``"activate": false`` among them.)"""
        protected = {v.key for v in (self.current(), self.previous()) if v is not None}
        removed = []
        by_name: dict[str, list[InstalledVersion]] = {}
        for v in self.versions():
            by_name.setdefault(v.name, []).append(v)
        for versions in by_name.values():
            for v in versions[: -max(keep, 1)]:  # oldest first, all but the newest `keep`
                if v.key not in protected:
                    self.remove(v)
                    removed.append(v)
        return removed

    def repair(self) -> list[str]:
        """Clean what a crash may have left: temp folders in staging, temp symlinks, versions
        without an install record. Returns what was removed (for the log)."""
        self.ensure_layout()
        removed: list[str] = []
        # staging/: versions being built or deleted; inbox/: folder packages being deleted.
        for path in [*self.staging_dir.glob(f"{TMP_PREFIX}*"), *self.inbox_dir.glob(f"{TMP_PREFIX}*")]:
            remove_tree(path)
            removed.append(str(path.relative_to(self.data_dir)))
        for path in self.data_dir.glob(f"*{TMP_PREFIX}*"):
            if path.is_symlink():
                path.unlink()
                removed.append(path.name)
        for name_dir in _subdirs(self.models_dir):
            for version_dir in _subdirs(name_dir):
                if self._read_record(version_dir) is None:
                    remove_tree(version_dir)
                    removed.append(str(version_dir.relative_to(self.data_dir)))
        if removed:
            log.warning("repository_repaired", removed=removed)
        return removed


def _subdirs(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from (p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
