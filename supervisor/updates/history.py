"""Which versions were active, in order: what ``POST /models/rollback`` walks back through.

Rolling back to the ``previous`` link toggled between the last two versions: a second rollback
went forward again. The activations are kept instead, oldest first, in ``<data-dir>/activations.json``
(so they survive a restart). An activation appends its version; a rollback goes to the entry before
the active one and forgets what came after it. So after v1, v2, v3: rollback -> v2, rollback -> v1,
rollback -> nothing older (409). Activating v1 by hand after v3 appends it (v1 v2 v3 v1): a rollback
then returns to v3, the version that was serving before, as the automatic rollback after a bad
activation must. Versions since deleted (retention) are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

from supervisor.formats import TMP_PREFIX
from supervisor.fsutil import fsync_dir, write_durably

__all__ = ["ActivationHistory", "Key"]

log = structlog.get_logger(__name__)

Key = tuple[str, str]  # (name, version)
# Kept entries: rollbacks rarely go back more than a few steps; the file stays small.
_LIMIT = 100


class ActivationHistory:
    """The activation order on disk. Blocking (small file reads and writes): call from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[Key]:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("activation_history_unreadable", path=self.path.name, error=str(exc))
            return []
        return [(str(e[0]), str(e[1])) for e in raw if isinstance(e, list) and len(e) == 2]

    def seed(self, keys: Iterable[Key | None]) -> None:
        """Start the history (first run, or after an upgrade) from what the repository links say."""
        if not self.path.exists():
            self._write([k for k in keys if k is not None])

    def record(self, key: Key) -> None:
        """``key`` became active (not by a rollback)."""
        entries = self.entries()
        if not entries or entries[-1] != key:
            self._write([*entries, key][-_LIMIT:])

    def rollback_target(self, current: Key | None, exists: Callable[[Key], bool]) -> Key | None:
        """The version to roll back to from ``current``: the latest entry before current's last one
        that is another version and still installed; None when there is none."""
        entries = self.entries()
        end = len(entries)
        if current is not None and current in entries:
            end = len(entries) - 1 - entries[::-1].index(current)
        return next((k for k in reversed(entries[:end]) if k != current and exists(k)), None)

    def rolled_back_to(self, key: Key) -> None:
        """A rollback made ``key`` active: forget what came after its last entry."""
        entries = self.entries()
        if key in entries:
            self._write(entries[: len(entries) - entries[::-1].index(key)])
        else:
            self.record(key)

    def _write(self, entries: list[Key]) -> None:
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}")
        write_durably(tmp, json.dumps([list(k) for k in entries]))
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
