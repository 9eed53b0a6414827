"""Reported properties and output messages: what is reported, and sending it through an offline hub.

While the module is disconnected the SDK fails ``patch_twin_reported_properties`` and
``send_message_to_output`` at once (``ConnectionFailedError``); nothing is queued. ``Reporter`` keeps
what could not be sent, coalesced: reported patches are merged (the latest value of each property wins)
and only the latest message per output is kept. It tries again on reconnect and every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from azure.iot.device import exceptions as iot_errors

from supervisor.redact import redact
from supervisor.updates.events import ModelEvent

__all__ = ["OUTPUT_NAME", "Reporter", "active_patch", "merge_patch", "model_output", "policy_patch", "status_patch"]

log = structlog.get_logger(__name__)

OUTPUT_NAME = "DLModelOutput"


# -- what is reported (the contract in docs/twin.md) ----------------------------------------------------
def status_patch(
    state: str,
    *,
    file_name: str | None,
    desired_version: int | None,
    reason: str | None = None,
    bytes_done: int | None = None,
    bytes_total: int | None = None,
    bytes_needed: int | None = None,
    bytes_fetched: int | None = None,
    bytes_reused: int | None = None,
    paused_until: str | None = None,
) -> dict[str, Any]:
    """The ``ModelUpdate`` status of one desired request, as a reported-properties patch."""
    status: dict[str, Any] = {
        "State": state,
        "FileName": file_name,
        "DesiredVersion": desired_version,
        "Reason": reason,  # None deletes the reason of an earlier failure
        "Timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if bytes_done is not None:
        status["BytesDone"] = bytes_done
        status["BytesTotal"] = bytes_total
    if bytes_needed is not None:
        status["BytesNeeded"] = bytes_needed
        status["BytesFetched"] = bytes_fetched
        status["BytesReused"] = bytes_reused
    status["PausedUntil"] = paused_until  # None deletes an earlier pause
    return {"ModelUpdate": status}


def policy_patch(policy: dict[str, Any]) -> dict[str, Any]:
    """The download policy (rate limit, windows) as a reported-properties patch."""
    return {"DownloadPolicy": {"RateLimit": policy["rate_limit"], "Windows": policy["windows"]}}


def active_patch(event: ModelEvent) -> dict[str, Any]:
    """The active model (from an 'active' event), as a reported-properties patch."""
    patch: dict[str, Any] = {"ModelUpdate": {"ActiveModel": {
        "Name": event.name, "Version": event.version, "SHA256": event.model_sha256,
        "Signer": event.signer,  # None (deleted) for an unsigned package
    }}}
    if event.package:  # the package the active model came from, when known
        patch["LatestAIModelFileName"] = event.package
    return patch


def model_output(event: ModelEvent) -> dict[str, Any]:
    """The ``DLModelOutput`` message body for a model that became active (paths relative to the data dir)."""
    return {
        "local_model_path": event.model_path,
        "local_labelmap_path": event.labels_path,
        "model_name": event.name,
        "model_version": event.version,
        "model_sha256": event.model_sha256,
    }


class _Hub(Protocol):
    @property
    def connected(self) -> bool: ...
    async def patch_reported(self, patch: dict[str, Any]) -> None: ...
    async def send_output(self, output: str, body: dict[str, Any], properties: dict[str, str]) -> None: ...


def merge_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``patch``, recursively, into a new dict. ``None`` values are kept: in a twin
    patch they delete the property, so they must reach the hub as they are."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Reporter:
    """Coalescing, retrying sender of reported properties and output messages."""

    def __init__(self, hub: _Hub, *, retry_interval: float = 5.0) -> None:
        self._hub = hub
        self.retry_interval = retry_interval
        self._patch: dict[str, Any] = {}
        self._outputs: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self._wake = asyncio.Event()
        self.sent_patches = 0
        self.sent_messages = 0

    @property
    def pending(self) -> bool:
        return bool(self._patch or self._outputs)

    def report(self, patch: dict[str, Any]) -> None:
        self._patch = merge_patch(self._patch, patch)
        self._wake.set()

    def send_output(
        self, output: str, body: dict[str, Any], properties: dict[str, str] | None = None
    ) -> None:
        self._outputs[output] = (body, dict(properties or {}))
        self._wake.set()

    def take_over(self, old: Reporter) -> None:
        """Adopt what ``old`` (a previous run's reporter) still had to send."""
        self._patch = merge_patch(old._patch, self._patch)
        self._outputs = {**old._outputs, **self._outputs}
        old._patch, old._outputs = {}, {}
        if self.pending:
            self._wake.set()

    def wake(self) -> None:
        """Try now (after a reconnect)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self.pending:
                # Not asyncio.wait_for, which on 3.11 may swallow a cancellation (see HubClient._call).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry_interval):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake.clear()
            if self.pending:
                await self.flush()

    async def flush(self) -> bool:
        """Send what is pending; True when nothing is left."""
        if self._patch:
            patch, self._patch = self._patch, {}
            try:
                await self._hub.patch_reported(patch)
                self.sent_patches += 1
            except iot_errors.ServiceError as exc:
                # The hub refused this patch (4xx): sending it again would be refused again.
                log.error("reported_patch_refused", error=redact(str(exc)))
            except Exception as exc:
                # Newer values that arrived meanwhile win over the ones that failed.
                self._patch = merge_patch(patch, self._patch)
                log.info("reported_patch_deferred", error=type(exc).__name__, connected=self._hub.connected)
                return False
        for output in list(self._outputs):
            body, props = self._outputs.pop(output)
            try:
                await self._hub.send_output(output, body, props)
                self.sent_messages += 1
            except Exception as exc:
                self._outputs.setdefault(output, (body, props))
                log.info("output_message_deferred", output=output, error=type(exc).__name__)
                return False
        return not self.pending
