"""Keep secrets out of logs and reported properties.

A blob SAS URL carries its credential in the query string (``sig=``); a connection string carries
``SharedAccessKey=``. Both must never reach a log line, a reported property or an error reason.
``redact`` works on any text; ``redact_processor`` is a structlog processor that applies it to every
value of an event (nested containers and objects such as ``yarl.URL`` or exceptions included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from structlog.processors import format_exc_info

__all__ = ["REDACTED", "redact", "redact_processor", "redact_url"]

REDACTED = "REDACTED"

# A query string that holds a SAS signature: drop it whole (se=, sp=, sv= say little, but a query
# string cut in the middle reads worse than a clearly redacted one).
_SAS_QUERY = re.compile(r"\?(?=[^\s\"'<>]*?\bsig(?:=|%3D))[^\s\"'<>#]*", re.IGNORECASE)
# A signature or key outside a URL query (a SharedAccessSignature header, a connection string).
_SECRET_PAIR = re.compile(
    r"\b(sig|SharedAccessKey|SharedAccessSignature|AccountKey)(=|%3D)[^\s\"'<>&;,]*", re.IGNORECASE
)
_HINTS = ("sig=", "sig%3d", "sharedaccess", "accountkey")
# Containers nested deeper than this are scrubbed as text rather than item by item.
_MAX_DEPTH = 6


def redact(text: str) -> str:
    """``text`` with SAS query strings and shared access keys replaced by ``REDACTED``."""
    lowered = text.lower()
    if not any(h in lowered for h in _HINTS):
        return text
    text = _SAS_QUERY.sub(f"?{REDACTED}", text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def redact_url(url: str) -> str:
    """A URL that is safe to show: scheme, host and path; the query string only if it holds no secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    query = parts.query
    if query and redact("?" + query) != "?" + query:
        query = REDACTED
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, query, ""))


def _scrub(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth <= _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {k: _scrub(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return type(value)(_scrub(v, depth + 1) for v in value)
    # Objects (yarl.URL, exceptions, paths), and containers nested deeper than _MAX_DEPTH: kept unless
    # their text holds a secret, then replaced by that text redacted (a secret never passes for depth).
    try:
        text = str(value)
    except Exception:
        return value
    cleaned = redact(text)
    return value if cleaned == text else cleaned


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every value of the event.

    Put it before the renderer, in both the structlog chain and the ``ProcessorFormatter``'s
    ``foreign_pre_chain`` so that stdlib loggers (aiohttp, azure.iot.device) are covered too. An
    ``exc_info`` is rendered to text here (as ``format_exc_info`` would) so that a URL inside an
    exception message is redacted as well; keys starting with ``_`` (structlog's own) are left alone.
    """
    if event_dict.get("exc_info"):
        event_dict = format_exc_info(_logger, _method, event_dict)
    for key, value in list(event_dict.items()):
        if not key.startswith("_"):
            event_dict[key] = _scrub(value)
    return event_dict
