"""Durable file-system steps shared by the repository and the downloader."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "fsync_tree", "remove_tree", "write_durably"]


def write_durably(path: Path, text: str) -> None:
    """Write and fsync a small file (a record that must survive a power cut once written)."""
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every regular file and folder under ``path``, ``path`` last: before a rename publishes a
    folder, what it holds must be on disk (written files are not, until their pages are flushed, and a
    power cut after the rename would leave a complete-looking folder of empty files). Symlinks are
    neither followed nor synced."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(root))


def remove_tree(path: Path) -> None:
    """Remove a file or a folder tree, best effort, never following a symlink.

    ``shutil.rmtree`` recurses once per level: a package nested a thousand folders deep (a USB stick can
    carry one) raises RecursionError, which ``ignore_errors`` does not catch. Here every sub-folder is
    first moved up to sit directly under ``path`` and emptied there, so neither the stack nor any path
    grows with the depth of the tree."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            path.unlink()
            return
    except OSError:
        return
    prefix = f".rm-{uuid.uuid4().hex[:12]}-"
    flattened: list[Path] = []
    queue = [path]
    while queue:
        folder = queue.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    flat = path / f"{prefix}{len(flattened)}"
                    os.rename(entry.path, flat)
                    flattened.append(flat)
                    queue.append(flat)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue
    for folder in [*flattened, path]:
        try:
            os.rmdir(folder)
        except OSError:
            pass
