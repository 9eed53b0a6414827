"""structlog set-up: JSON when stdout is not a TTY, console output when it is; stdlib loggers
(aiohttp.access, azure.iot.device, ...) go through the same processors. A request id and the
model version are bound through contextvars by the API."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from supervisor.redact import redact_processor

__all__ = ["configure_logging"]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Last before rendering, for structlog events and stdlib records (aiohttp, azure.iot.device)
        # alike: no SAS signature or access key reaches a log line.
        redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDK and paho are chatty at INFO: keep their warnings only.
    for noisy in ("azure.iot.device", "paho", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # watchfiles logs "N changes detected" at INFO for every batch of file events: that is debug
    # detail (the watcher logs what it does with them), shown only when debugging.
    debugging = root.getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("watchfiles").setLevel(logging.NOTSET if debugging else logging.WARNING)
    # The API logs one line per request itself, with the request id and model.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
