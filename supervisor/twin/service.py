"""Remote model updates through the IoT Hub module twin.

Desired properties name one model package (``FileName``, ``DownloadUrl``, hashes, ...). The service
reconciles: on connect, on every reconnect and on every desired patch it reads the whole twin and hands
the request it holds to the ``Reconciler`` (reconcile.py), which downloads, verifies and hands the
package to the update pipeline, or uses the copy already installed. Events, the reconciler's and the
pipeline's, become reported properties (``_REPORTED_STATE``) and, for each model that becomes active, a
``DLModelOutput`` message; when the service starts, the model then active is announced the same way
unless it was already. It knows nothing about runtimes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import structlog

from supervisor.package.reasons import clip
from supervisor.redact import redact, redact_url
from supervisor.twin.client import RETRYABLE, HubClient, describe_mode
from supervisor.twin.connection_string import check_module_connection_string
from supervisor.twin.desired import DesiredModel
from supervisor.twin.download import DownloadCounters
from supervisor.twin.gate import Gate, parse_window
from supervisor.twin.incremental import IncrementalDownload
from supervisor.twin.reconcile import Reconciler, Updates, Watch
from supervisor.twin.reporter import (
    OUTPUT_NAME,
    Reporter,
    active_patch,
    merge_patch,
    model_output,
    policy_patch,
    status_patch,
)
from supervisor.twin.status import TwinStatus
from supervisor.updates.events import TWIN_STATES, ModelEvent

__all__ = ["OUTPUT_NAME", "DesiredModel", "TwinService", "Updates"]

log = structlog.get_logger(__name__)

_NOT_RETRIED = frozenset({"failed", "rolled_back"})

# The ``ModelUpdate.State`` (docs/twin.md) an event about the desired request becomes: the reconciler's
# own events, and pipeline events that concern its running job. Not listed (received, duplicate, the
# pipeline's failed): no report, the job goes on or its own event follows. "already_installed" reads as
# "active" or "stored", whichever the installed model is (``_report_event``).
_REPORTED_STATE = {
    "downloading": "downloading",
    "downloaded": "verifying",
    "validating": "verifying",
    "activating": "activating",
    "active": "active",
    "stored": "stored",
    "rejected": "failed",
    "download_failed": "failed",
    "update_failed": "failed",
}


def _model_key(event: ModelEvent) -> tuple[str | None, str | None, str | None]:
    """What makes two DLModelOutput messages name the same model."""
    return event.name, event.version, event.model_sha256


class TwinService:
    """Connects, reads desired properties into requests for the ``Reconciler``, and turns pipeline events
    into reported properties and ``DLModelOutput`` messages."""

    def __init__(
        self,
        settings: Any,
        updates: Updates,
        *,
        env: Mapping[str, str] | None = None,
        progress_interval: float = 30.0,
        retry_interval: float = 5.0,
        twin_timeout: float = 30.0,
        pipeline_timeout: float = 600.0,
        download_retries: int = 5,
        download_backoff: tuple[float, float] = (1.0, 30.0),
        download_read_timeout: float = 30.0,
        connection_retry_interval: int = 10,
        status: TwinStatus | None = None,
        download_counters: DownloadCounters | None = None,
    ) -> None:
        self.settings = settings
        self.status = status or TwinStatus()
        self.updates = updates
        self._env = os.environ if env is None else env
        self.twin_timeout = twin_timeout
        self.pipeline_timeout = pipeline_timeout
        self.gate = Gate(
            int(getattr(settings, "download_rate_limit", 0) or 0),
            [parse_window(w) for w in getattr(settings, "download_windows", None) or ()],
        )
        self.status.download = self.gate.describe
        self._reconciler = Reconciler(
            updates, progress_interval=progress_interval, pipeline_timeout=pipeline_timeout,
            download_options={
                "retries": download_retries,
                "backoff_base": download_backoff[0],
                "backoff_max": download_backoff[1],
                "read_timeout": download_read_timeout,
                "counters": download_counters,
            },
            gate=self.gate,
        )
        self._retry_interval = retry_interval
        self._connection_retry_interval = connection_retry_interval
        self.hub: HubClient | None = None
        self.reporter: Reporter | None = None
        self._desired_version: int | None = None
        self._patch_hint: dict[str, Any] | None = None
        self._resync = asyncio.Event()
        self._last_state: str | None = None
        self._answered: int | None = None  # the newest desired $version a status was reported for
        # Kept for the life of the process, across supervised restarts of run().
        self._last_output: tuple[str | None, str | None, str | None] | None = None

    @property
    def last_download(self) -> IncrementalDownload | None:
        """The latest download started (for tests and diagnostics)."""
        return self._reconciler.last_download

    # ----------------------------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Run until cancelled; disconnects cleanly on the way out."""
        mode = describe_mode(self.settings.twin, self.settings.connection_string, self._env)
        if mode in ("off", "standalone"):
            log.info(
                "twin_disabled" if mode == "off" else "twin_standalone",
                detail="no IoT Hub connection: updates come from the drop folder only",
            )
            self.status.set("off" if mode == "off" else "standalone", mode=mode,
                            reason="no IoT Edge environment and no EDGELOADER_CONNECTION_STRING"
                            if mode == "standalone" else "EDGELOADER_TWIN=off")
            await asyncio.Future()  # nothing to do until cancelled
        if mode == "connection-string":
            try:
                check_module_connection_string(self.settings.connection_string or "")
            except ValueError as exc:
                await self._stay_off(mode, f"EDGELOADER_CONNECTION_STRING {exc}")
        log.info("twin_mode", mode=mode)
        self.status.set("connecting", mode=mode)
        try:
            hub = await asyncio.to_thread(
                HubClient.create, mode, self.settings.connection_string, self._env,
                connection_retry_interval=self._connection_retry_interval, op_timeout=self.twin_timeout,
            )
        except (ValueError, TypeError, OSError) as exc:
            # A configuration the SDK refuses (or an unreadable EDGELOADER_CA_CERT): the same next
            # time, so restarting would only loop. The SDK's own words, redacted, say which.
            await self._stay_off(mode, redact(f"cannot create the IoT Hub client: {exc}")[:300])
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
                tg.create_task(self._reconciler.run(), name="twin-reconciler")
                await self._start(hub)
                tg.create_task(self._resync_loop(), name="twin-resync")
                # Each run, not once per process: a run restarted by the supervisor may have missed an
                # activation's message. The same-model check keeps it from repeating one.
                tg.create_task(self._announce_active(), name="twin-announce")
        finally:
            await self._reconciler.stop()
            await hub.shutdown()
            log.info("twin_stopped")

    async def _stay_off(self, mode: str, reason: str) -> None:
        """A configuration error: say it once, show it in /models, and wait to be stopped (no restart loop)."""
        log.error("twin_off", mode=mode, reason=reason,
                  hint="models still arrive through the drop folder; fix the setting and restart the module")
        self.status.set("off", mode=mode, reason=reason)
        await asyncio.Future()

    def _reset(self) -> None:
        self._desired_version = None
        self._answered = None
        self._patch_hint = None
        self._resync = asyncio.Event()
        self._reconciler.reset()

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
        self.status.set("connected")
        self._apply_twin(twin, startup=True)
        await hub.on_desired_patch(self._on_desired_patch)
        assert self.reporter is not None
        self.reporter.report(policy_patch(self.gate.describe()))
        active = self.updates.active()
        if active is not None:
            self._report_active(active)

    # ------------------------------------------------------------------------- desired properties
    def _on_connection_change(self, connected: bool) -> None:
        log.info("iothub_connection", connected=connected)
        self.status.set("connected" if connected else "disconnected")
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
            self._reconciler.drop()
            self._report_status("failed", file_name=desired.get("FileName"), desired_version=version,
                                reason=f"bad desired properties: {exc}")
            return
        if request is None:
            log.info("desired_no_model", version=version)
            self._reconciler.drop(clean_staging_dir=True)
            return
        log.info("desired_model", version=version, file=request.file_name, url=redact_url(request.url),
                 sha256=request.sha256, activate=request.activate)
        self._reconciler.want(request)

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
        **figures: Any,
    ) -> None:
        request = self._reconciler.request
        status = status_patch(
            state,
            file_name=file_name if file_name is not None else request.file_name if request else None,
            desired_version=(
                desired_version if desired_version is not None else request.desired_version if request else None
            ),
            reason=clip(redact(reason)) if reason else None,  # the full text is in the log
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            **figures,
        )
        self._last_state = state
        self.status.reported(status["ModelUpdate"])
        answered = status["ModelUpdate"]["DesiredVersion"]
        if isinstance(answered, int) and (self._answered is None or answered > self._answered):
            self._answered = answered
        log.info("model_update_status", **{k: v for k, v in status["ModelUpdate"].items() if v is not None})
        active = self.updates.active() if state == "active" else None
        if active is not None:
            # One patch: whoever reads "active" also reads which model it is.
            status = merge_patch(active_patch(active), status)
        assert self.reporter is not None
        self.reporter.report(status)

    def _report_active(self, event: ModelEvent) -> None:
        assert self.reporter is not None
        self.reporter.report(active_patch(event))

    def _send_model_output(self, event: ModelEvent) -> None:
        assert self.reporter is not None
        self._last_output = _model_key(event)
        self.reporter.send_output(OUTPUT_NAME, model_output(event))

    async def _announce_active(self) -> None:
        """Send one ``DLModelOutput`` for the model active after start-up. Modules routed after us, or a
        hub that lost the message of the last activation, would otherwise not know it until the next
        activation. Waits until the start-up twin has settled what is active (not announcing a model
        about to be replaced), and skips a model that an activation of this process already announced."""
        try:
            async with asyncio.timeout(self.pipeline_timeout):
                await self._reconciler.settled()
        except TimeoutError:
            log.warning("announce_not_settled", detail="announcing the model active now")
        active = self.updates.active()
        if active is None:
            return
        if _model_key(active) == self._last_output:
            log.info("active_model_already_announced", name=active.name, version=active.version)
            return
        log.info("active_model_announced", name=active.name, version=active.version)
        self._send_model_output(active)

    async def _watch_events(self) -> None:
        async for event in self.updates.events.subscribe():
            self._on_event(event)

    def _on_event(self, event: ModelEvent) -> None:
        if event.state == "active":
            self._report_active(event)
            self._send_model_output(event)
        elif event.state == "rolled_back":
            # The 'active' event of the version rolled back to came first (and was reported). This one
            # names the version now active: if the twin's package was active, it is not any more.
            # Report it, so that a restart does not activate it again.
            request = self._reconciler.request
            if (
                request is not None and self._reconciler.idle
                and self._last_state == "active" and event.package != request.file_name
            ):
                self._report_status("rolled_back", reason=event.reason or f"rolled back ({event.source})")
        watch = self._reconciler.deliver(event)
        if watch is not None or event.state in TWIN_STATES:
            self._report_event(event, watch)

    def _report_event(self, event: ModelEvent, watch: Watch | None) -> None:
        """Report an event about the desired request: the reconciler's own (``watch`` None), or one of the
        pipeline's that concerns the reconciler's running job (``watch``: what the job waits for)."""
        state = _REPORTED_STATE.get(event.state)
        if event.state == "already_installed":
            active = self.updates.active()
            is_active = active is not None and (active.name, active.version) == (event.name, event.version)
            state = "active" if is_active else "stored"
        if state is None:
            return
        reason = (event.reason or f"package {event.state}") if state == "failed" else None
        if watch is not None:
            # The request is the running job's (Reconciler.request); the size is its download's.
            self._report_status(state, reason=reason, bytes_done=watch.size, bytes_total=watch.size)
            return
        version = event.desired_version
        if isinstance(version, int) and self._answered is not None and version < self._answered:
            # From a job that a newer request (or a refused one, already reported) has replaced.
            log.debug("stale_twin_event_ignored", state=event.state, version=version, answered=self._answered)
            return
        self._report_status(state, reason=reason, bytes_done=event.bytes_done, bytes_total=event.bytes_total,
                            file_name=event.package, desired_version=version, bytes_needed=event.bytes_needed,
                            bytes_fetched=event.bytes_fetched, bytes_reused=event.bytes_reused,
                            paused_until=event.paused_until)
