"""Bringing the desired model package into effect, one request at a time.

``TwinService`` (service.py) reads the desired properties and hands each parsed request to
``Reconciler.want``. The reconciler runs one job for the latest request: a package already installed
(same SHA-256) is never downloaded again, only activated if the request asks for it; anything else is
downloaded into ``staging/`` (resumable and verified, download.py) and handed to the update pipeline,
whose events say how it ended.

Like every flow, a job says what happened through the event bus, never by calling back into the service:
its own steps are ``TWIN_STATES`` events (``downloading`` with progress, ``downloaded``,
``download_failed``, ``already_installed``, ``update_failed``; source ``twin``, with the desired
``$version`` they answer), and the pipeline publishes the rest. ``TwinService`` turns both into reported
properties; ``deliver`` tells it which pipeline events concern the running job.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from supervisor.redact import redact
from supervisor.twin.desired import DesiredModel
from supervisor.twin.download import DownloadError, DownloadResult
from supervisor.twin.gate import Gate
from supervisor.twin.incremental import IncrementalDownload
from supervisor.twin.partfile import commit, resume_note_path
from supervisor.updates.events import TWIN_STATES, EventBus, ModelEvent, State

__all__ = ["Reconciler", "Updates", "Watch", "clean_staging"]

log = structlog.get_logger(__name__)

# Pipeline events after which a handed-over package needs nothing more from us.
_FINAL = frozenset({"active", "stored", "rejected", "duplicate", "failed"})


class Updates(Protocol):
    """What the twin needs from the update pipeline and the repository."""

    @property
    def events(self) -> EventBus: ...

    @property
    def staging_dir(self) -> Path: ...

    def find_package(self, sha256: str) -> tuple[str, str] | None:
        """(name, version) installed from a package with this SHA-256, or None."""

    def active(self) -> ModelEvent | None:
        """The active model as an 'active' event, or None."""

    async def activate(self, name: str, version: str, source: str) -> object:
        """Make an installed model active; raises on failure; publishes events."""

    def stored_files(self) -> list[tuple[Path, str]]:
        """(path, SHA-256) of the big files of every stored version: where a download may find
        chunks of a new package (twin/incremental.py). Blocking."""


@dataclass(eq=False)
class Watch:
    """What the running job waits to hear from the pipeline: the package it handed over (known by
    SHA-256, or by file name for early events from staging that carry none), or the installed model it
    activates. Pipeline events that concern it are queued for the job until a final one."""

    sha256: str | None = None
    file_name: str | None = None
    model: tuple[str, str] | None = None
    size: int | None = None  # of the downloaded package (BytesDone, BytesTotal)
    final: frozenset[str] = _FINAL
    events: asyncio.Queue[ModelEvent] = field(default_factory=asyncio.Queue)

    def concerns(self, event: ModelEvent) -> bool:
        if self.model is not None:
            # Any source: an activation of the same model by someone else answers the request as well.
            return event.state in ("activating", "active", "failed") and (event.name, event.version) == self.model
        if self.sha256 is not None and event.sha256 == self.sha256:
            return True
        return event.source in ("twin", "staging") and event.package == self.file_name


def clean_staging(staging: Path, keep: set[str]) -> None:
    """Remove what interrupted downloads left in staging (``*.part`` files and resume notes), except
    ``keep``: a request that no longer is desired must not hold disk space. Blocking."""
    try:
        entries = list(os.scandir(staging))
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        stale = name.endswith(".part") or (name.startswith(".") and name.endswith(".resume"))
        if stale and name not in keep and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                log.info("staging_stale_removed", file=name)
            except OSError as exc:
                log.warning("staging_cleanup_failed", file=name, error=str(exc))


class Reconciler:
    """Runs one job at a time for the latest desired request. A newer request cancels the running job
    (its partial download stays for a later resume), unless both name the same package: then the
    running job goes on and answers the newer ``$version``."""

    def __init__(
        self,
        updates: Updates,
        *,
        progress_interval: float,
        pipeline_timeout: float,
        download_options: Mapping[str, Any],
        gate: Gate | None = None,
    ) -> None:
        self.updates = updates
        self.gate = gate or Gate()
        self.progress_interval = progress_interval
        self.pipeline_timeout = pipeline_timeout
        self._download_options = dict(download_options)
        self.last_download: IncrementalDownload | None = None  # for tests and diagnostics
        self.request: DesiredModel | None = None  # what the running (or last) job answers
        self._wanted: DesiredModel | None = None
        self._wanted_changed = asyncio.Event()
        self._job: asyncio.Task[None] | None = None
        self._watch: Watch | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        # "Settled": no job is about to change the active model (see settled()).
        self._scheduling = False
        self._downloading = False
        self._settled = asyncio.Event()
        self._settled.set()

    def reset(self) -> None:
        """Forget requests and jobs: a new run of the service starts from the twin again."""
        self.request = self._wanted = self._job = self._watch = None
        self._wanted_changed = asyncio.Event()
        self._scheduling = self._downloading = False
        self._settled = asyncio.Event()
        self._settled.set()

    async def stop(self) -> None:
        """Cancel the running job and wait (a few seconds at most) until it has let go of its files, and
        until staging clean-ups have ended."""
        tasks = [*self._cleanups]
        if self._job is not None:
            self._cancel_job()
            tasks.append(self._job)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                log.warning("twin_task_slow_to_stop", task=task.get_name())

    def _cancel_job(self) -> None:
        # Pipeline events still on their way no longer answer anything.
        self._watch = None
        if self._job is not None and not self._job.done():
            self._job.cancel()

    @property
    def idle(self) -> bool:
        """No job is running (the last one, if any, has ended)."""
        return self._job is None or self._job.done()

    def want(self, request: DesiredModel) -> None:
        self._wanted = request
        self._wanted_changed.set()
        self._settled.clear()

    def drop(self, *, clean_staging_dir: bool = False) -> None:
        """Want nothing: cancel the running job. ``clean_staging_dir``: also remove partial downloads,
        as no request will resume them."""
        self._wanted = None
        self._cancel_job()
        if clean_staging_dir:
            task = asyncio.create_task(self._clean_staging(), name="twin-staging-cleanup")
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        self._refresh_settled()

    async def _clean_staging(self) -> None:
        await asyncio.to_thread(clean_staging, Path(self.updates.staging_dir), set())

    async def settled(self) -> None:
        """Return once no job is about to change the active model: none is wanted or running, or the
        running one is downloading (which may take days on a bad link; if it ends in an activation,
        that activation is announced as any other)."""
        while not self._settled.is_set():
            await self._settled.wait()

    def _refresh_settled(self) -> None:
        busy = self._scheduling or self._wanted_changed.is_set() or not (self.idle or self._downloading)
        if busy:
            self._settled.clear()
        else:
            self._settled.set()

    async def run(self) -> None:
        while True:
            await self._wanted_changed.wait()
            # While a superseded job winds down, its end must not read as "settled".
            self._scheduling = True
            try:
                self._wanted_changed.clear()
                if self._wanted is not None:
                    await self._schedule(self._wanted)
            finally:
                self._scheduling = False
                self._refresh_settled()

    async def _schedule(self, request: DesiredModel) -> None:
        job = self._job
        if job is not None and not job.done():
            if self.request is not None and self.request.same_target(request):
                self.request = request  # same package: the running job answers the new version
                return
            log.info("update_superseded", old=self.request and self.request.file_name, new=request.file_name)
            self._cancel_job()
            await asyncio.wait([job])
        self.request = request
        self._job = asyncio.create_task(self._fulfil(request), name=f"twin-update-{request.file_name}")
        self._job.add_done_callback(lambda _: self._refresh_settled())

    def deliver(self, event: ModelEvent) -> Watch | None:
        """Pass a pipeline event to the running job if it concerns it, and return the job's watch; None
        for any other event (the twin's own events included). The watch closes at its final event."""
        watch = self._watch
        if watch is None or event.state in TWIN_STATES or not watch.concerns(event):
            return None
        watch.events.put_nowait(event)
        if event.state in watch.final:
            self._watch = None
        return watch

    def _publish(self, state: State, request: DesiredModel, **fields: Any) -> None:
        """Say what the job for ``request`` did: an event of the twin's own (``TWIN_STATES``)."""
        assert state in TWIN_STATES, state
        if self.request is not None and self.request.same_target(request):
            request = self.request  # the job answers the newest $version that asks for the same
        self.updates.events.publish(ModelEvent(
            state, "twin", request.file_name, desired_version=request.desired_version, **fields,
        ))

    # ------------------------------------------------------------------------------- one request
    async def _fulfil(self, request: DesiredModel) -> None:
        self._watch = None
        try:
            if request.sha256 and (found := self.updates.find_package(request.sha256)):
                await self._use_installed(request, request.sha256, found)
                return
            result = await self._download(request)
            # Without a SHA-256 in the request (MD5 only), only the bytes tell whether we have it.
            if (found := self.updates.find_package(result.sha256)) is not None:
                await asyncio.to_thread(result.path.unlink, missing_ok=True)
                await self._use_installed(request, result.sha256, found)
                return
            await self._hand_over(request, result.sha256, result.size)
        except asyncio.CancelledError:
            log.info("update_cancelled", file=request.file_name)
            raise
        except DownloadError as exc:
            log.warning("download_failed", file=request.file_name, reason=exc.reason)
            self._publish("download_failed", request, reason=exc.reason)
        except Exception as exc:
            log.exception("update_failed", file=request.file_name)
            self._publish("update_failed", request, reason=redact(f"{type(exc).__name__}: {exc}")[:300])

    async def _download(self, request: DesiredModel) -> DownloadResult:
        staging = Path(self.updates.staging_dir)
        part = staging / f"{request.file_name}.part"
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(clean_staging, staging, {part.name, resume_note_path(part).name})
        last = 0.0

        def figures(**extra: Any) -> dict[str, Any]:
            return {"bytes_done": download.bytes_done, "bytes_total": download.total,
                    "bytes_needed": download.bytes_needed, "bytes_fetched": download.bytes_fetched,
                    "bytes_reused": download.bytes_reused, **extra}

        def progress(done: int, total: int | None) -> None:
            # At most one report per progress_interval: the twin has update quotas.
            nonlocal last
            now = time.monotonic()
            if now - last >= self.progress_interval:
                last = now
                self._publish("downloading", request, **figures())

        def paused(until: datetime | None) -> None:
            self._publish("downloading", request,
                          **figures(paused_until=until.isoformat(timespec="seconds") if until else None))

        download = IncrementalDownload(
            request.url, part, seeds=self.updates.stored_files, expected_length=request.length,
            sha256=request.sha256, md5=request.md5, gate=self.gate, progress=progress, **self._download_options,
        )
        self._publish("downloading", request, bytes_done=0, bytes_total=request.length)
        last = time.monotonic()
        self.last_download = download
        self._downloading = True
        self._refresh_settled()
        self.gate.on_pause = paused
        try:
            result = await download.run()
        finally:
            self.gate.on_pause = None
            self._downloading = False
            self._refresh_settled()
        self._publish("downloaded", request, sha256=result.sha256, **figures(bytes_done=result.size,
                                                                              bytes_total=result.size))
        return result

    async def _hand_over(self, request: DesiredModel, sha256: str, size: int) -> None:
        staging = Path(self.updates.staging_dir)
        intent: dict[str, Any] = {"source": "twin", "sha256": sha256, "activate": request.activate,
                                  "desired_version": request.desired_version}
        if request.name:
            intent["name"] = request.name
        if request.version:
            intent["version"] = request.version
        # Listen before the package appears in staging: the pipeline may answer at once. The service
        # reports the pipeline's events (validating, activating, active, stored, rejected) as they come.
        watch = self._watch = Watch(sha256=sha256, file_name=request.file_name, size=size)
        try:
            part = staging / f"{request.file_name}.part"
            await asyncio.to_thread(commit, part, staging / request.file_name, intent)
            async with asyncio.timeout(self.pipeline_timeout):
                while (event := await watch.events.get()).state not in _FINAL:
                    pass
        except TimeoutError:
            self._publish("update_failed", request, reason="the update pipeline did not answer in time")
            return
        finally:
            if self._watch is watch:
                self._watch = None
        if event.state == "duplicate" and (found := self.updates.find_package(sha256)):
            await self._use_installed(request, sha256, found)
        elif event.state in ("duplicate", "failed"):  # active, stored and rejected speak for themselves
            self._publish("update_failed", request, reason=redact(event.reason or f"package {event.state}")[:300])

    async def _use_installed(self, request: DesiredModel, sha256: str, found: tuple[str, str]) -> None:
        name, version = found
        active = self.updates.active()
        is_active = active is not None and (active.name, active.version) == (name, version)
        log.info("package_already_installed", file=request.file_name, name=name, version=version,
                 active=is_active, activate=request.activate)
        if is_active or not request.activate:
            self._publish("already_installed", request, sha256=sha256, name=name, version=version)
            return
        # Set with no await since active() was read: an activation of this model by anyone from now on
        # is heard. The watch stays open after activate() returns, until the service has seen the answer.
        self._watch = Watch(model=(name, version), final=frozenset({"active", "failed"}))
        try:
            await self.updates.activate(name, version, "twin")
        except Exception as exc:
            self._watch = None
            self._publish("update_failed", request, reason=redact(f"activation failed: {exc}")[:300])
