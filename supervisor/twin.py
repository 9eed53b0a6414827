"""Remote model updates through the IoT Hub module twin.

Desired properties name one model package (``FileName``, ``DownloadUrl``, hashes, ...). The service
reconciles: on connect, on every reconnect and on every desired patch it reads the whole twin and
compares it with what is installed. A package already here (same SHA-256) is never downloaded again,
only activated if needed; anything else is downloaded (``download.py``), verified and handed to the
update pipeline through ``staging/``. Pipeline events become reported properties and, for each model
that becomes active, a ``DLModelOutput`` message. It knows nothing about runtimes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from supervisor.download import Download, DownloadError, DownloadResult
from supervisor.events import EventBus, ModelEvent
from supervisor.partfile import commit, resume_note_path
from supervisor.redact import redact, redact_url
from supervisor.reporter import OUTPUT_NAME, Reporter, active_patch, merge_patch, model_output, status_patch
from supervisor.twin_client import RETRYABLE, HubClient, describe_mode
from supervisor.twinpatch import DesiredModel

__all__ = ["OUTPUT_NAME", "DesiredModel", "TwinService", "Updates"]

log = structlog.get_logger(__name__)

_FINAL = frozenset({"active", "stored", "rejected", "duplicate", "failed"})
_NOT_RETRIED = frozenset({"failed", "rolled_back"})


class Updates(Protocol):
    """What the twin needs from the update pipeline and the repository."""

    @property
    def events(self) -> EventBus: ...

    @property
    def staging_dir(self) -> Path: ...

    @property
    def data_dir(self) -> Path: ...

    def find_package(self, sha256: str) -> tuple[str, str] | None:
        """(name, version) installed from a package with this SHA-256, or None."""

    def active(self) -> ModelEvent | None:
        """The active model as an 'active' event, or None."""

    async def activate(self, name: str, version: str, source: str) -> object:
        """Make an installed model active; raises on failure; publishes events."""


def _clean_staging(staging: Path, keep: set[str]) -> None:
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


class TwinService:
    """Turns desired properties into verified packages in staging, and events into reported state."""

    def __init__(
        self,
        settings: Any,
        updates: Updates,
        *,
        env: Mapping[str, str] | None = None,
        progress_interval: float = 5.0,
        retry_interval: float = 5.0,
        twin_timeout: float = 30.0,
        pipeline_timeout: float = 600.0,
        download_retries: int = 5,
        download_backoff: tuple[float, float] = (1.0, 30.0),
        download_read_timeout: float = 30.0,
        connection_retry_interval: int = 10,
    ) -> None:
        self.settings = settings
        self.updates = updates
        self._env = os.environ if env is None else env
        self.progress_interval = progress_interval
        self.twin_timeout = twin_timeout
        self.pipeline_timeout = pipeline_timeout
        self._download_options: dict[str, Any] = {
            "retries": download_retries,
            "backoff_base": download_backoff[0],
            "backoff_max": download_backoff[1],
            "read_timeout": download_read_timeout,
        }
        self._retry_interval = retry_interval
        self._connection_retry_interval = connection_retry_interval
        self.hub: HubClient | None = None
        self.reporter: Reporter | None = None
        self.last_download: Download | None = None  # for tests and diagnostics
        self._desired_version: int | None = None
        self._patch_hint: dict[str, Any] | None = None
        self._resync = asyncio.Event()
        self._wanted: DesiredModel | None = None
        self._wanted_changed = asyncio.Event()
        self._job: asyncio.Task[None] | None = None
        self._job_req: DesiredModel | None = None
        self._waiters: dict[str, asyncio.Queue[ModelEvent]] = {}
        self._last_state: str | None = None
        self._stale_cleanup: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Run until cancelled; disconnects cleanly on the way out."""
        mode = describe_mode(self.settings.twin, self.settings.connection_string, self._env)
        if mode in ("off", "standalone"):
            log.info(
                "twin_disabled" if mode == "off" else "twin_standalone",
                detail="no IoT Hub connection: updates come from the drop folder only",
            )
            await asyncio.Future()  # nothing to do until cancelled
        log.info("twin_mode", mode=mode)
        hub = await asyncio.to_thread(
            HubClient.create, mode, self.settings.connection_string, self._env,
            connection_retry_interval=self._connection_retry_interval, op_timeout=self.twin_timeout,
        )
        reporter = Reporter(hub, retry_interval=self._retry_interval)
        if self.reporter is not None:  # a restart (supervised): what the last run could not send
            reporter.take_over(self.reporter)
        self.hub, self.reporter = hub, reporter
        self._reset()
        hub.on_connection_change(self._on_connection_change)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_events(), name="twin-events")
                # Let the event watcher subscribe before any download can hand a package over.
                await asyncio.sleep(0)
                tg.create_task(self.reporter.run(), name="twin-reporter")
                tg.create_task(self._reconciler(), name="twin-reconciler")
                await self._start(hub)
                tg.create_task(self._resync_loop(), name="twin-resync")
        finally:
            if self._job is not None:
                self._job.cancel()
                await asyncio.wait([self._job], timeout=5)
            await hub.shutdown()
            log.info("twin_stopped")

    def _reset(self) -> None:
        self._desired_version = None
        self._patch_hint = None
        self._resync = asyncio.Event()
        self._wanted = None
        self._wanted_changed = asyncio.Event()
        self._job = self._job_req = None
        self._waiters = {}

    async def _start(self, hub: HubClient) -> None:
        delay = 1.0
        while True:
            try:
                await hub.connect()
                twin = await hub.get_twin()
                break
            except RETRYABLE as exc:
                log.warning("iothub_connect_failed", error=redact(f"{type(exc).__name__}: {exc}"),
                            retry_in=round(delay, 1))
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
        log.info("iothub_connected")
        self._apply_twin(twin, startup=True)
        await hub.on_desired_patch(self._on_desired_patch)
        active = self.updates.active()
        if active is not None:
            self._report_active(active, send_message=False)

    # ------------------------------------------------------------------------- desired properties
    def _on_connection_change(self, connected: bool) -> None:
        log.info("iothub_connection", connected=connected)
        if connected:
            self._resync.set()
            assert self.reporter is not None
            self.reporter.wake()

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        version = patch.get("$version")
        handled = self._desired_version
        if isinstance(version, int) and handled is not None and version <= handled:
            log.debug("desired_patch_ignored", version=version, handled=self._desired_version)
            return
        # A patch is a hint: it may be a delta or the whole document, and versions may have been
        # missed. The twin itself is the truth, so read it; the patch is the fallback.
        self._patch_hint = patch
        self._resync.set()

    async def _resync_loop(self) -> None:
        assert self.hub is not None
        while True:
            await self._resync.wait()
            self._resync.clear()
            try:
                twin = await self.hub.get_twin()
            except RETRYABLE as exc:
                log.info("twin_read_failed", error=type(exc).__name__)
                hint, self._patch_hint = self._patch_hint, None
                if hint is not None and isinstance(hint.get("$version"), int):
                    self._apply_desired(hint)
                if self.hub.connected:
                    await asyncio.sleep(self._retry_interval)
                    self._resync.set()
                continue
            self._patch_hint = None
            self._apply_twin(twin)

    def _apply_twin(self, twin: Mapping[str, Any], startup: bool = False) -> None:
        desired = dict(twin.get("desired") or {})
        if startup:
            # After a restart, do not retry what already failed for this very version (no crash loop).
            status = (twin.get("reported") or {}).get("ModelUpdate") or {}
            if (
                isinstance(status, dict) and status.get("State") in _NOT_RETRIED
                and status.get("DesiredVersion") is not None
                and status.get("DesiredVersion") == desired.get("$version")
            ):
                log.info("desired_already_failed", version=desired.get("$version"),
                         reason=status.get("Reason"))
                self._desired_version = desired.get("$version")
                return
        self._apply_desired(desired)

    def _apply_desired(self, desired: dict[str, Any]) -> None:
        version = desired.get("$version")
        if isinstance(version, int):
            if self._desired_version is not None and version <= self._desired_version:
                return
            self._desired_version = version
        try:
            request = DesiredModel.parse(desired)
        except ValueError as exc:
            log.warning("desired_invalid", version=version, reason=str(exc))
            self._cancel_job()
            self._report_status("failed", file_name=desired.get("FileName"), desired_version=version,
                                reason=f"bad desired properties: {exc}")
            return
        if request is None:
            log.info("desired_no_model", version=version)
            self._cancel_job()
            self._stale_cleanup = asyncio.create_task(
                asyncio.to_thread(_clean_staging, Path(self.updates.staging_dir), set())
            )
            return
        log.info("desired_model", version=version, file=request.file_name, url=redact_url(request.url),
                 sha256=request.sha256, activate=request.activate)
        self._wanted = request
        self._wanted_changed.set()

    def _cancel_job(self) -> None:
        self._wanted = None
        if self._job is not None and not self._job.done():
            self._job.cancel()

    async def _reconciler(self) -> None:
        while True:
            await self._wanted_changed.wait()
            self._wanted_changed.clear()
            request = self._wanted
            if request is None:
                continue
            if self._job is not None and not self._job.done():
                if self._job_req is not None and self._job_req.same_target(request):
                    self._job_req = request  # same package: the running job answers the new version
                    continue
                log.info("update_superseded", old=self._job_req and self._job_req.file_name,
                         new=request.file_name)
                self._job.cancel()
                await asyncio.wait([self._job])
            self._job_req = request
            self._job = asyncio.create_task(self._fulfil(request), name=f"twin-update-{request.file_name}")

    # ------------------------------------------------------------------------------- one update
    async def _fulfil(self, request: DesiredModel) -> None:
        try:
            if request.sha256 and (found := self.updates.find_package(request.sha256)):
                await self._use_installed(request, found)
                return
            result = await self._download(request)
            if (found := self.updates.find_package(result.sha256)) is not None:
                await asyncio.to_thread(result.path.unlink, missing_ok=True)
                await self._use_installed(request, found)
                return
            await self._hand_over(request, result.sha256, result.size)
        except asyncio.CancelledError:
            log.info("update_cancelled", file=request.file_name)
            raise
        except DownloadError as exc:
            log.warning("download_failed", file=request.file_name, reason=exc.reason)
            self._report_status("failed", reason=exc.reason)
        except Exception as exc:
            log.exception("update_failed", file=request.file_name)
            self._report_status("failed", reason=redact(f"{type(exc).__name__}: {exc}")[:300])

    async def _download(self, request: DesiredModel) -> DownloadResult:
        staging = Path(self.updates.staging_dir)
        part = staging / f"{request.file_name}.part"
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_clean_staging, staging, {part.name, resume_note_path(part).name})
        last = 0.0

        def progress(done: int, total: int | None) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= self.progress_interval:
                last = now
                self._report_status("downloading", bytes_done=done, bytes_total=total)

        self._report_status("downloading", bytes_done=0, bytes_total=request.length)
        last = time.monotonic()
        download = Download(
            request.url, part, expected_length=request.length,
            sha256=request.sha256, md5=request.md5, progress=progress, **self._download_options,
        )
        self.last_download = download
        result = await download.run()
        self._report_status("verifying", bytes_done=result.size, bytes_total=result.size)
        return result

    async def _hand_over(self, request: DesiredModel, sha256: str, size: int) -> None:
        staging = Path(self.updates.staging_dir)
        intent: dict[str, Any] = {"source": "twin", "sha256": sha256, "activate": request.activate,
                                  "desired_version": request.desired_version}
        if request.name:
            intent["name"] = request.name
        if request.version:
            intent["version"] = request.version
        queue: asyncio.Queue[ModelEvent] = asyncio.Queue()
        self._waiters[sha256] = queue
        self._waiters[request.file_name] = queue
        try:
            part = staging / f"{request.file_name}.part"
            await asyncio.to_thread(commit, part, staging / request.file_name, intent)
            async with asyncio.timeout(self.pipeline_timeout):
                while True:
                    event = await queue.get()
                    if event.state == "validating":
                        self._report_status("verifying", bytes_done=size, bytes_total=size)
                    elif event.state == "activating":
                        self._report_status("activating", bytes_done=size, bytes_total=size)
                    elif event.state in _FINAL:
                        break
        except TimeoutError:
            self._report_status("failed", reason="the update pipeline did not answer in time")
            return
        finally:
            self._waiters.pop(sha256, None)
            self._waiters.pop(request.file_name, None)
        if event.state == "active":
            self._report_status("active", bytes_done=size, bytes_total=size)
        elif event.state == "stored":
            self._report_status("stored", bytes_done=size, bytes_total=size)
        elif event.state == "duplicate" and (found := self.updates.find_package(sha256)):
            await self._use_installed(request, found)
        else:
            self._report_status("failed", reason=redact(event.reason or f"package {event.state}")[:300])

    async def _use_installed(self, request: DesiredModel, found: tuple[str, str]) -> None:
        name, version = found
        active = self.updates.active()
        is_active = active is not None and (active.name, active.version) == (name, version)
        log.info("package_already_installed", file=request.file_name, name=name, version=version,
                 active=is_active, activate=request.activate)
        if is_active:
            self._report_status("active")
        elif not request.activate:
            self._report_status("stored")
        else:
            self._report_status("activating")
            try:
                await self.updates.activate(name, version, "twin")
            except Exception as exc:
                self._report_status("failed", reason=redact(f"activation failed: {exc}")[:300])
                return
            self._report_status("active")

    # --------------------------------------------------------------------------------- reporting
    def _report_status(
        self,
        state: str,
        *,
        reason: str | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        file_name: str | None = None,
        desired_version: int | None = None,
    ) -> None:
        request = self._job_req
        status = status_patch(
            state,
            file_name=file_name if file_name is not None else request.file_name if request else None,
            desired_version=(
                desired_version if desired_version is not None else request.desired_version if request else None
            ),
            reason=redact(reason) if reason else None,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
        )
        self._last_state = state
        log.info("model_update_status", **{k: v for k, v in status["ModelUpdate"].items() if v is not None})
        active = self.updates.active() if state == "active" else None
        if active is not None:
            # One patch: whoever reads "active" also reads which model it is.
            status = merge_patch(active_patch(active), status)
        assert self.reporter is not None
        self.reporter.report(status)

    def _report_active(self, event: ModelEvent, send_message: bool = True) -> None:
        assert self.reporter is not None
        self.reporter.report(active_patch(event))
        if send_message:
            self.reporter.send_output(OUTPUT_NAME, model_output(event))

    async def _watch_events(self) -> None:
        async for event in self.updates.events.subscribe():
            if event.state == "active":
                self._report_active(event)
            elif event.state == "rolled_back":
                # The 'active' event of the version rolled back to came first (and was reported). This one
                # names the version now active: if the twin's package was active, it is not any more.
                # Report it, so that a restart does not activate it again.
                request = self._job_req
                if (
                    request is not None and self._job is not None and self._job.done()
                    and self._last_state == "active" and event.package != request.file_name
                ):
                    self._report_status("rolled_back", reason=event.reason or f"rolled back ({event.source})")
            queue = self._waiters.get(event.sha256 or "")
            if queue is None and event.source in ("twin", "staging"):
                queue = self._waiters.get(event.package)
            if queue is not None:
                queue.put_nowait(event)
