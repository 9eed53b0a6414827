"""The listening socket, bound before anything else starts.

Binding first means a port that is taken, a host that is no address of this machine or a port that
needs privileges fails at once with one line, before a model is loaded, and the ``serving`` log
line can name the port actually bound (``--port 0`` picks a free one)."""

from __future__ import annotations

import errno
import socket

from supervisor.errors import StartupError

__all__ = ["bind"]

_HINT = "choose another with --port or EDGELOADER_PORT"


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not yet listening: aiohttp does that). Raises
    StartupError with one line saying what to change."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on host {host!r}: {exc.strerror}; set --host or EDGELOADER_HOST "
                           "to an address of this machine (0.0.0.0: all of them)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As asyncio's create_server does: a restart may rebind while old connections linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_error(exc, host, port)) from None
    return sock


def _bind_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another edgeloader?); stop that program or {_HINT}"
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges this user lacks; {_HINT} (1024 or above)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; set --host or EDGELOADER_HOST (0.0.0.0: all of them)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
