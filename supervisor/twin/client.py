"""A thin asyncio face on the synchronous ``azure-iot-device`` module client.

Every blocking SDK call runs in a daemon thread of its own, with a timeout of ours (``get_twin`` has
none). The SDK may never complete a request whose answer was lost with the connection, not even at
``shutdown()``; such a thread is abandoned, and being a daemon it cannot hold the process at exit
(a ``ThreadPoolExecutor`` worker would: they are joined at exit). The SDK calls its handlers on its
own threads; they are handed to the event loop with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog
from azure.iot.device import IoTHubModuleClient, Message
from azure.iot.device import exceptions as iot_errors

__all__ = ["RETRYABLE", "HubClient", "describe_mode"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Errors after which the same call may succeed later (the hub is away, not saying no).
RETRYABLE: tuple[type[BaseException], ...] = (
    iot_errors.ClientError,  # ConnectionFailedError, ConnectionDroppedError, NoConnectionError, ...
    iot_errors.OperationTimeout,
    iot_errors.OperationCancelled,
    TimeoutError,
)
_EDGE_VARS = ("IOTEDGE_MODULEID", "IOTEDGE_WORKLOADURI", "IOTEDGE_IOTHUBHOSTNAME")
CA_CERT_ENV = "EDGELOADER_CA_CERT"


def describe_mode(twin: str, connection_string: str | None, env: Mapping[str, str]) -> str:
    """"off", "edge", "connection-string" or "standalone": how the service reaches IoT Hub."""
    if twin == "off":
        return "off"
    if all(v in env for v in _EDGE_VARS) or "EdgeHubConnectionString" in env:
        return "edge"
    if connection_string:
        return "connection-string"
    if twin == "on":
        raise ValueError("twin = 'on' but neither an IoT Edge environment nor a connection string is set")
    return "standalone"


class HubClient:
    """One IoT Hub module identity. Create with ``from_settings``; call ``shutdown`` when done."""

    def __init__(self, client: IoTHubModuleClient, *, op_timeout: float = 30.0) -> None:
        self._client = client
        self.op_timeout = op_timeout
        self.in_flight = 0  # SDK calls whose thread has not returned (stuck ones included)
        self._count_lock = threading.Lock()

    @classmethod
    def create(
        cls,
        mode: str,
        connection_string: str | None,
        env: Mapping[str, str],
        *,
        connection_retry_interval: int = 10,
        op_timeout: float = 30.0,
    ) -> HubClient:
        kwargs: dict[str, Any] = {"connection_retry_interval": connection_retry_interval}
        if mode == "edge":
            # The SDK reads the IOTEDGE_* variables from os.environ itself.
            client = IoTHubModuleClient.create_from_edge_environment(**kwargs)
        else:
            assert connection_string
            ca_file = env.get(CA_CERT_ENV)
            if ca_file:
                kwargs["server_verification_cert"] = Path(ca_file).read_text()
            client = IoTHubModuleClient.create_from_connection_string(connection_string, **kwargs)
        return cls(client, op_timeout=op_timeout)

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # timed out or cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            finally:
                with self._count_lock:
                    self.in_flight -= 1
            self._post(loop, lambda: settle(result, error))

        with self._count_lock:
            self.in_flight += 1
        threading.Thread(target=run, name=f"iothub-{getattr(fn, '__name__', 'call')}", daemon=True).start()
        return future

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        # Not asyncio.wait_for: on 3.11 it swallows a cancellation that arrives as the call completes,
        # and a task that outlives its cancel keeps the twin service from stopping.
        async with asyncio.timeout(self.op_timeout):
            return await self._in_thread(fn, *args)

    async def connect(self) -> None:
        await self._call(self._client.connect)

    async def get_twin(self) -> dict[str, Any]:
        twin = await self._call(self._client.get_twin)
        return dict(twin)

    async def patch_reported(self, patch: dict[str, Any]) -> None:
        await self._call(self._client.patch_twin_reported_properties, patch)

    async def send_output(self, output: str, body: Mapping[str, Any], properties: Mapping[str, str]) -> None:
        message = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
        message.custom_properties.update(properties)
        await self._call(self._client.send_message_to_output, message, output)

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        """``callback(connected)`` on the event loop after every connect or disconnect."""
        loop = asyncio.get_running_loop()

        def handler() -> None:  # SDK handler thread
            self._post(loop, lambda: callback(self.connected))

        # The SDK types this handler as taking one argument, but calls it with none.
        self._client.on_connection_state_change = handler  # type: ignore[assignment]

    async def on_desired_patch(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(patch)`` on the event loop for each desired-properties patch.

        Set it only after ``connect()`` and a first ``get_twin()``: set earlier, the SDK's own start-up
        twin request loses its answer and the SDK never re-reads the twin after a reconnect.
        """
        loop = asyncio.get_running_loop()

        def handler(patch: dict[str, Any]) -> None:  # SDK handler thread
            self._post(loop, lambda: callback(dict(patch)))

        # The setter subscribes (a blocking round trip to the hub).
        await self._call(setattr, self._client, "on_twin_desired_properties_patch_received", handler)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: the service is gone
            pass

    async def shutdown(self, wait: float = 10.0) -> None:
        """Disconnect and stop the SDK's threads. ``shutdown()`` blocks, so it runs in its own thread."""
        try:
            async with asyncio.timeout(wait):
                await self._in_thread(self._client.shutdown)
        except Exception as exc:
            log.warning("iothub_shutdown_failed", error=f"{type(exc).__name__}: {exc}")

