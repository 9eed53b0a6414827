"""One internal channel for model state changes.

The pipeline and the twin's reconciler publish; the log, ``/models`` and the twin service subscribe.
Publishing never blocks and never fails: a slow subscriber loses its oldest events, not the publisher's
time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import structlog

__all__ = ["TWIN_STATES", "EventBus", "ModelEvent", "State"]

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
    # The twin's own steps for one desired request (source "twin", with desired_version):
    "downloading",  # the package is being downloaded into staging (bytes_done of bytes_total)
    "downloaded",  # downloaded and verified against the desired hashes; the pipeline takes it from here
    "download_failed",  # the download failed (HTTP error, checksum, length, disk); nothing changed
    "already_installed",  # the package is installed already (same SHA-256) and need not be activated
    "update_failed",  # the request ended without a change for a reason of the twin's (no answer from
    # the pipeline in time, the installed package could not be activated, an unexpected error)
]

# Published only by the twin's reconciler, about the desired request it works on.
TWIN_STATES: frozenset[str] = frozenset(
    {"downloading", "downloaded", "download_failed", "already_installed", "update_failed"}
)


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
    signer: str | None = None  # who signed the active model's package: "ops (sha256:…)"; None: unsigned
    at: float = field(default_factory=time.time)
    # Twin events: the desired $version they answer, and download progress.
    desired_version: int | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    # What the download costs the link: bytes it must fetch, has fetched, took from stored versions.
    bytes_needed: int | None = None
    bytes_fetched: int | None = None
    bytes_reused: int | None = None
    paused_until: str | None = None  # outside the download windows: when it goes on (local, ISO 8601)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class EventBus:
    """Fan-out of ModelEvents to any number of async subscribers, plus a short history."""

    def __init__(self, history: int = 200, queue_size: int = 1000) -> None:
        self.history: deque[ModelEvent] = deque(maxlen=history)
        self._queues: set[asyncio.Queue[ModelEvent]] = set()
        self._queue_size = queue_size

    def publish(self, event: ModelEvent) -> None:
        last = self.history[-1] if self.history else None
        if (
            event.state == "downloading" and last is not None and last.state == "downloading"
            and (last.source, last.package) == (event.source, event.package)
        ):
            # Progress of a download that may take days: one entry in the history, the latest.
            self.history[-1] = event
            log.debug("model_event", **event.to_dict())  # the twin logs it as model_update_status
        else:
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
