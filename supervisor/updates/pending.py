"""Work in progress that is not a model yet: downloads under way, as the event bus tells them.

The bus keeps one history entry per download (the latest progress replaces the one before), which
says how far it is but not how fast it goes. ``Downloads`` follows the events and keeps, per download,
when it was first seen and with how many bytes, so that ``/models`` and the status page can show a
rate. Packages waiting in the drop folders are the watcher's to tell (``PackageWatcher.pending``).

Times leave the service as ISO 8601 UTC strings (``iso_utc``): epoch floats mean nothing to the person
reading ``/models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from supervisor.updates.events import ModelEvent

__all__ = ["Downloads", "iso_utc"]

# A download is over at any of these (the twin's own states; the pipeline's follow under other names).
_DOWNLOAD_OVER = frozenset({"downloaded", "download_failed", "update_failed", "already_installed"})


def iso_utc(ts: object) -> str | None:
    """``1767225600.5`` -> ``"2026-01-01T00:00:00.500Z"``; anything but a number (None, a damaged
    record's value) -> None."""
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


@dataclass
class _Download:
    package: str
    desired_version: int | None
    started: float
    first_bytes: int
    bytes_done: int
    bytes_total: int | None
    updated: float

    def public(self) -> dict[str, Any]:
        elapsed = self.updated - self.started
        rate = (self.bytes_done - self.first_bytes) / elapsed if elapsed > 0 else None
        return {
            "package": self.package,
            "desired_version": self.desired_version,
            "since": iso_utc(self.started),
            "updated": iso_utc(self.updated),
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_per_second": round(rate) if rate is not None else None,
        }


class Downloads:
    """Downloads in progress, from ``downloading`` events until the download's end."""

    def __init__(self) -> None:
        self._running: dict[str, _Download] = {}

    def on_event(self, event: ModelEvent) -> None:
        if event.source != "twin":
            return
        if event.state == "downloading":
            # One job at a time (twin/reconcile.py): a download of another package means the one
            # before was cancelled (a newer request), which publishes no event of its own.
            for other in [p for p in self._running if p != event.package]:
                del self._running[other]
            done = event.bytes_done or 0
            known = self._running.get(event.package)
            if known is None or done < known.bytes_done:  # a new download, or one that started over
                self._running[event.package] = _Download(
                    event.package, event.desired_version, event.at, done, done, event.bytes_total, event.at)
            else:
                known.bytes_done, known.bytes_total, known.updated = done, event.bytes_total, event.at
                known.desired_version = event.desired_version
        elif event.state in _DOWNLOAD_OVER:
            self._running.pop(event.package, None)

    def in_progress(self) -> list[dict[str, Any]]:
        return [d.public() for d in self._running.values()]
