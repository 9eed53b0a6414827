"""A memory budget shared by the image decodes in flight.

Pixels alone do not bound memory: a 117 KB WebP of 49 megapixels needs about 830 MB to decode,
four at once 1.5 GB, on a device that may have 1 GB. Each request reserves what its decode will
need (``handlers.decodecost``) before a worker thread starts on it. One that alone needs more than
the whole budget is refused (413); others wait for room, in the event loop, without holding a
worker thread, and are answered 503 if none frees up in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["BudgetExceeded", "BudgetTimeout", "MemoryBudget"]


class BudgetExceeded(ValueError):
    """One reservation is larger than the whole budget."""


class BudgetTimeout(TimeoutError):
    """No room freed up within the wait."""


class MemoryBudget:
    def __init__(self, limit_bytes: int, wait_seconds: float) -> None:
        self.limit = limit_bytes
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self._room = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[None]:
        if amount > self.limit:
            raise BudgetExceeded(f"needs about {amount >> 20} MB, over the {self.limit >> 20} MB budget")
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self.in_use + amount <= self.limit),
                                       self.wait_seconds)
            except TimeoutError:
                raise BudgetTimeout(f"no room for {amount >> 20} MB within {self.wait_seconds:g} s") from None
            self.in_use += amount
        try:
            yield
        finally:
            async with self._room:
                self.in_use -= amount
                self._room.notify_all()
