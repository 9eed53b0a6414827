"""When and how fast downloads may use the link: ``download_rate_limit`` and ``download_windows``.

A site's uplink (satellite, cellular) carries more than model updates. ``Gate`` paces every body byte
a download reads to the rate limit (a token bucket with one second of burst), and keeps downloads
inside the configured windows of device-local time: outside them a download stops its request,
keeps what it has, waits for the next window and resumes with a Range request. One gate is shared by
every download of the service, so the limit holds for the link, not per request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["DownloadWindow", "Gate", "WindowClosed", "parse_window"]

_WINDOW = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-4]):([0-5]\d)\s*$")
_DAY = 24 * 60


class WindowClosed(Exception):
    """The download window closed while a request was running: stop it, keep the bytes, wait."""


@dataclass(frozen=True)
class DownloadWindow:
    """From ``start`` to ``end``, minutes after local midnight; an end before the start runs past
    midnight ("22:00-04:00")."""

    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

    def contains(self, minute: float) -> bool:
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def parse_window(text: str) -> DownloadWindow:
    """"HH:MM-HH:MM" (24-hour, device local time); ValueError otherwise."""
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a time window like \"01:00-05:00\"")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if end > _DAY or start == end:
        raise ValueError(f"{text!r} is not a time window like \"01:00-05:00\"")
    return DownloadWindow(start, end)


def _minute_of_day(now: datetime) -> float:
    return now.hour * 60 + now.minute + now.second / 60 + now.microsecond / 60e6


class Gate:
    """Rate limit and time windows for the downloads of one service (see the module docstring).

    ``clock`` gives the local wall time (tests pass their own); ``on_pause`` is told the time a
    paused download resumes (None when it goes on)."""

    def __init__(
        self,
        rate_limit: int = 0,
        windows: Sequence[DownloadWindow] = (),
        *,
        clock: Callable[[], datetime] = datetime.now,
        check_seconds: float = 60.0,
    ) -> None:
        self.rate_limit = rate_limit
        self.windows = tuple(windows)
        self.clock = clock
        self.check_seconds = check_seconds
        self._tokens = float(rate_limit)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self.paused_until: datetime | None = None
        self.on_pause: Callable[[datetime | None], None] | None = None

    def describe(self) -> dict[str, object]:
        """For /models and the reported properties."""
        return {"rate_limit": self.rate_limit, "windows": [str(w) for w in self.windows],
                "paused_until": self.paused_until.isoformat(timespec="seconds") if self.paused_until else None}

    def is_open(self) -> bool:
        if not self.windows:
            return True
        minute = _minute_of_day(self.clock())
        return any(w.contains(minute) for w in self.windows)

    def next_open(self) -> datetime:
        """When the next window starts (now when one is open)."""
        now = self.clock()
        if self.is_open():
            return now
        minute = _minute_of_day(now)
        waits = [(w.start - minute) % _DAY for w in self.windows]
        return now + timedelta(minutes=min(waits))

    async def wait_open(self) -> None:
        """Return once inside a window; meanwhile ``paused_until`` says until when. Re-checked every
        ``check_seconds`` at most, so a changed clock (NTP after a cold start) is followed."""
        if self.is_open():
            return
        try:
            while not self.is_open():
                until = self.next_open()
                if until != self.paused_until:
                    self.paused_until = until
                    if self.on_pause is not None:
                        self.on_pause(until)
                wait = (until - self.clock()).total_seconds()
                await asyncio.sleep(min(max(wait, 0.05), self.check_seconds))
        finally:
            if self.paused_until is not None:
                self.paused_until = None
                if self.on_pause is not None:
                    self.on_pause(None)

    async def take(self, nbytes: int) -> None:
        """Account for ``nbytes`` read from the network: sleep as the rate limit needs, and raise
        ``WindowClosed`` when the window has closed meanwhile."""
        if self.rate_limit > 0:
            async with self._lock:  # one bucket for every download
                now = time.monotonic()
                self._tokens = min(float(self.rate_limit), self._tokens + (now - self._stamp) * self.rate_limit)
                self._stamp = now
                self._tokens -= nbytes
                if self._tokens < 0:
                    await asyncio.sleep(-self._tokens / self.rate_limit)
        if not self.is_open():
            raise WindowClosed("outside the download windows")

    def read_size(self, preferred: int) -> int:
        """How many bytes to read at once: small enough that a slow limit paces smoothly."""
        if self.rate_limit > 0:
            return max(1024, min(preferred, self.rate_limit // 4))
        return preferred
