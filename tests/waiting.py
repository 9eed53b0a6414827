"""One way for tests to wait: poll a condition, bounded in time, failing with what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["eventually"]


async def eventually(
    predicate: Callable[[], Any],
    within: float = 5.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {within} s waiting for {text}")
        await asyncio.sleep(interval)
