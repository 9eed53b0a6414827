"""One internal channel for model state changes.

The pipeline publishes; the log, ``/models`` and the twin reporter subscribe. Publishing never
blocks and never fails: a slow subscriber loses its oldest events, not the publisher's time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import structlog

__all__ = ["EventBus", "ModelEvent", "State"]

log = structlog.get_logger(__name__)

State = Literal[
    "received",  # a package was seen (drop folder, staging, CLI, API)
    "validating",
    "activating",
    "active",
    "stored",  # valid and installed, but the manifest asked not to activate it
    "rejected",  # quarantined, with a reason
    "duplicate",  # same bytes as a package already processed: ignored
    "rolled_back",
    "failed",  # an activation (API, rollback) that did not happen; nothing changed
]


@dataclass(frozen=True)
class ModelEvent:
    state: State
    source: str  # "inbox", "staging", "cli", "api", "startup", "auto-rollback", "twin"
    package: str  # file or folder name as received (never a URL)
    name: str | None = None
    version: str | None = None
    sha256: str | None = None  # of the package as received
    reason: str | None = None
    model_sha256: str | None = None  # of the model file, for the active model
    # Where the active model's files lie, relative to the data dir (for DLModelOutput).
    model_path: str | None = None
    labels_path: str | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class EventBus:
    """Fan-out of ModelEvents to any number of async subscribers, plus a short history."""

    def __init__(self, history: int = 200, queue_size: int = 1000) -> None:
        self.history: deque[ModelEvent] = deque(maxlen=history)
        self._queues: set[asyncio.Queue[ModelEvent]] = set()
        self._queue_size = queue_size

    def publish(self, event: ModelEvent) -> None:
        self.history.append(event)
        log.info("model_event", **event.to_dict())
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[ModelEvent]:
        """Events published from now on, until the consumer stops iterating."""
        q: asyncio.Queue[ModelEvent] = asyncio.Queue(self._queue_size)
        self._queues.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.discard(q)
