"""What the twin service is doing, for ``/models``: connected, trying, or off and why."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["TwinState", "TwinStatus"]

TwinState = Literal["starting", "connecting", "connected", "disconnected", "standalone", "off"]


@dataclass
class TwinStatus:
    """Updated by the twin service on the event loop; read by the API."""

    state: TwinState = "starting"
    mode: str | None = None  # "edge", "connection-string" once known
    reason: str | None = None  # why it is off (a configuration error, EDGELOADER_TWIN=off)
    since: float = field(default_factory=time.time)
    # The latest ``ModelUpdate`` status reported (or queued while offline), as sent: State, FileName,
    # DesiredVersion, Reason, Timestamp and, for a download, BytesDone and BytesTotal.
    last_report: dict[str, Any] | None = None
    # The download policy and whether a download waits for its window (twin/gate.py), once known.
    download: Callable[[], dict[str, Any]] | None = None

    def set(self, state: TwinState, *, mode: str | None = None, reason: str | None = None) -> None:
        self.state, self.reason, self.since = state, reason, time.time()
        if mode is not None:
            self.mode = mode

    def reported(self, status: dict[str, Any]) -> None:
        self.last_report = dict(status)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "mode": self.mode, "reason": self.reason, "since": self.since,
                               "last_report": self.last_report}
        if self.download is not None:
            out["download"] = self.download()
        return out
