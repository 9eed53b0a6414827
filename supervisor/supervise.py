"""Run a long-lived service forever: a named task that is restarted with capped exponential
backoff and jitter when it crashes, within a restart budget, and cancelled cleanly on shutdown."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog

__all__ = ["supervised"]

log = structlog.get_logger(__name__)


async def _run_forever(
    name: str,
    factory: Callable[[], Awaitable[None]],
    base_delay: float,
    max_delay: float,
    budget: int,
    window: float,
) -> None:
    crashes: list[float] = []
    while True:
        try:
            await factory()
            log.warning("service_returned", service=name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("service_crashed", service=name)
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < window] + [now]
        if len(crashes) > budget:
            log.error("service_gave_up", service=name, crashes=len(crashes), window_s=window)
            return
        delay = min(max_delay, base_delay * 2 ** (len(crashes) - 1)) * random.uniform(0.5, 1.0)
        log.info("service_restarting", service=name, in_s=round(delay, 2))
        await asyncio.sleep(delay)


@asynccontextmanager
async def supervised(
    name: str,
    factory: Callable[[], Awaitable[None]],
    *,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    budget: int = 20,
    window: float = 600.0,
) -> AsyncIterator[asyncio.Task[None]]:
    """Keep ``factory()`` running while the context is open (use it inside a cleanup_ctx)."""
    task = asyncio.create_task(_run_forever(name, factory, base_delay, max_delay, budget, window), name=name)
    try:
        yield task
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("service_stop_failed", service=name)
