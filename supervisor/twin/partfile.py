"""The ``.part`` file of a download: appended to and hashed on the way, resumable after a cut
or a restart (with a small ``.<FileName>.resume`` note beside it), and handed to the update
pipeline in two atomic steps. Blocking: used from a worker thread."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from supervisor.formats import INTENT_SUFFIX
from supervisor.fsutil import fsync_dir

__all__ = ["PartFile", "commit", "resume_note_path"]


class PartFile:
    """The ``.part`` file and the running hashes of what it holds. Used from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def reset(self) -> None:
        self.close()
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open across chunks, closed in close()
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def reopen(self) -> int:
        """Continue an existing file: hash what it holds, then append. Returns its size."""
        self.reset_hashes()
        self.close()
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        while block := self._file.read(1 << 20):
            self.sha256.update(block)
            self.md5.update(block)
            self.size += len(block)
        return self.size

    def reset_hashes(self) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def resume_note_path(part: Path) -> Path:
    """``<staging>/.<FileName>.resume`` for ``<staging>/<FileName>.part`` (a dot-name: never a package)."""
    stem = part.name.removesuffix(".part")
    return part.with_name(f".{stem}.resume")


def commit(part: Path, dest: Path, intent: dict[str, Any] | None = None) -> None:
    """Hand a verified file to the pipeline: ``<dest>.intent.json`` first, then ``part`` -> ``dest``.

    Blocking (fsync): call it in a thread. The sidecar is written as ``*.intent.json.part`` and renamed,
    so the watcher, which ignores ``*.part`` and ``*.intent.json``, never sees half of either. The
    intent records the file's ``size``: a file in staging with the size its intent names arrived whole
    by this rename, and the watcher hands it over without waiting for it to settle. (A crash between
    the two renames leaves an intent without its package, which the next commit overwrites.)
    """
    if intent is not None:
        intent = {**intent, "size": os.stat(part).st_size}
        sidecar = dest.with_name(dest.name + INTENT_SUFFIX)
        tmp = sidecar.with_name(sidecar.name + ".part")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(intent, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sidecar)
    os.replace(part, dest)
    fsync_dir(dest.parent)
