"""A full disk is the device's condition, not a package's defect.

A write that fails with ENOSPC (or EDQUOT) says nothing about the package being written: the same
package installs once space returns. ``DiskFull`` carries that meaning through the layers (archive
unpacking, the repository, the pipeline), so that the pipeline leaves such a package where it can
be tried again instead of quarantining it (which would cost more space) and remembering its hash as
bad. ``ensure_room`` checks before a big write, so that the common case fails early with a clear
reason instead of filling the disk to the last byte.

Dependency-free (a shared leaf): package/, updates/ and the twin use it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

__all__ = ["DISK_FULL_ERRNOS", "RESERVE_BYTES", "DiskFull", "ensure_room", "free_bytes", "is_disk_full"]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Left free beyond what a write needs: the repository's records, symlinks and logs still need room.
RESERVE_BYTES = 4 << 20


class DiskFull(OSError):
    """Not enough disk space for a step; ``needed`` (bytes, when known) is what would let it succeed."""

    def __init__(self, message: str, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message


def free_bytes(path: Path) -> int:
    """Bytes free for this process on the filesystem of ``path`` (the nearest existing folder)."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except FileNotFoundError:
            continue
    return 0


def ensure_room(path: Path, needed: int, what: str) -> None:
    """Raise DiskFull unless the filesystem of ``path`` has ``needed`` bytes free and the reserve."""
    free = free_bytes(path)
    if free < needed + RESERVE_BYTES:
        raise DiskFull(f"not enough disk space to {what}: {_mb(needed)} needed, {_mb(free)} free",
                       needed=needed + RESERVE_BYTES, free=free)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is a full disk (ENOSPC, EDQUOT, DiskFull)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"
