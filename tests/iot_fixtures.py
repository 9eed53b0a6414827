"""Real parts for twin and download tests, all on loopback.

- ``iot_hub``: mosquitto with TLS on a random 127.x.y.z:8883 (CA and server certificate made here with
  ``cryptography``; the SDK always dials 8883 and checks the host name), a ``FaultProxy`` in front of it
  (so the hub can "go away" without a broker restart, which would leave the SDK unsubscribed), and a
  ``HubSimulator`` that answers the module's twin topics through a plain listener via paho.
- ``azurite`` / ``blob_store``: the official Azure Blob emulator and real SAS URLs.
- ``FaultProxy``: a TCP proxy that can cut after K bytes, stall, throttle, refuse or go offline.
- ``blob_server``: a small HTTP blob server of our own (aiohttp) for the answers Azurite never gives:
  a server that ignores ``Range`` or conditional headers, a reused ETag, a body without a length.

Tests that need mosquitto or Azurite skip when a tool is missing, but fail when env ``CI`` is set.
Install both with ``scripts/install-test-services.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pytest
from aiohttp import web
from waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
AZURITE_ACCOUNT = "devstoreaccount1"
# The well-known development key from Azurite's README (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MQTT_PORT = 8883


def require_tool(name: str, *candidates: Path) -> str:
    """The path of a tool; a missing one skips the test, or fails it when env CI is set."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: run scripts/install-test-services.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def random_loopback_ip() -> str:
    """A 127.x.y.z address (not 127.0.0.x) where port 8883 is free."""
    for _ in range(50):
        ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as s:
            try:
                s.bind((ip, MQTT_PORT))
            except OSError:
                continue
        return ip
    raise RuntimeError("no free 127.x.y.z:8883")




# ------------------------------------------------------------------------------------ certificates
class TestCA:
    """A throw-away certificate authority issuing server certificates for loopback IPs."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeloader test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, ip: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server at ``ip``."""
        x509, ec = self._x509, self._ec
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, ip)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, self._hashes.SHA256())
        )
        key_pem = key.private_bytes(
            self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8, self._ser.NoEncryption()
        )
        return cert.public_bytes(self._ser.Encoding.PEM), key_pem


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA()


# ------------------------------------------------------------------------------------- fault proxy
class FaultProxy:
    """A TCP proxy on its own thread and event loop (usable from sync and async tests alike).

    Faults apply to the downstream direction (server -> client), where a download's bytes flow:
    - ``cut_after(k)``: the next connection is closed (FIN) after k bytes; with ``then_refuse`` the
      listener closes first, so the client's retries are refused until ``online()``;
    - ``stall_after(k)``: the next connection stops forwarding after k bytes but stays open;
    - ``throttle(rate)``: every connection is paced to ``rate`` bytes per second (None: full speed);
    - ``refuse()``: the listener closes (connection refused), open connections live on;
    - ``offline()``: refuse, and drop every open connection; ``online()`` listens again.
    """

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int) -> None:
        self.listen = (listen_host, listen_port)
        self.target = (target_host, target_port)
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.closed = 0  # connections over
        self._cut: int | None = None
        self._refuse_after_cut = False
        self._stall: int | None = None
        self._rate: float | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> FaultProxy:
        self._thread.start()
        self.online()
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.offline()

        async def cancel_all() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._call(cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def cut_after(self, nbytes: int, *, then_refuse: bool = False) -> None:
        self._cut = nbytes
        self._refuse_after_cut = then_refuse

    def stall_after(self, nbytes: int) -> None:
        self._stall = nbytes

    def throttle(self, rate: float | None) -> None:
        self._rate = rate

    def online(self) -> None:
        async def listen() -> None:
            if self._server is None:
                self._server = await asyncio.start_server(self._handle, *self.listen, reuse_address=True)

        self._call(listen())

    def refuse(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None

        self._call(close())

    def offline(self) -> None:
        self.refuse()

        async def drop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        self._call(drop())

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        cut, self._cut = self._cut, None
        stall, self._stall = self._stall, None
        try:
            try:
                s_reader, s_writer = await asyncio.open_connection(*self.target)
            except OSError:
                c_writer.transport.abort()
                return
            self._writers.update((c_writer, s_writer))
            up = asyncio.ensure_future(self._pipe(c_reader, s_writer, None, None, down=False))
            down = asyncio.ensure_future(self._pipe(s_reader, c_writer, cut, stall, down=True))
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            if stall is not None and not down.done():
                await up  # stalled: keep the connection open until the client gives up
            for t in (up, down):
                t.cancel()
            for w in (c_writer, s_writer):
                w.close()
                self._writers.discard(w)
        finally:
            self.closed += 1
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: int | None,
        stall: int | None, *, down: bool,
    ) -> None:
        sent = 0
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if cut is not None and sent + len(data) >= cut:
                    data = data[: cut - sent]
                    writer.write(data)
                    self.bytes_down += len(data)
                    await writer.drain()
                    if self._refuse_after_cut and self._server is not None:
                        self._server.close()  # before the FIN: no retry can slip in
                        self._server = None
                    writer.close()  # FIN: a deterministic cut
                    return
                if stall is not None and sent + len(data) >= stall:
                    data = data[: stall - sent]
                    writer.write(data)
                    self.bytes_down += len(data)
                    await writer.drain()
                    await asyncio.Event().wait()  # forward nothing more, ever
                rate = self._rate if down else None
                step = max(1024, int(rate / 20)) if rate else len(data)
                for i in range(0, len(data), step):
                    piece = data[i : i + step]
                    writer.write(piece)
                    await writer.drain()
                    if down:
                        self.bytes_down += len(piece)
                    else:
                        self.bytes_up += len(piece)
                    if rate:
                        await asyncio.sleep(len(piece) / rate)
                sent += len(data)
            if writer.can_write_eof():
                writer.write_eof()


@contextlib.contextmanager
def fault_proxy(target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                listen_port: int | None = None) -> Iterator[FaultProxy]:
    proxy = FaultProxy(listen_host, listen_port or free_port(listen_host), target_host, target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------- mosquitto
class Mosquitto:
    def __init__(self, binary: str, workdir: Path, host: str, tls_port: int, plain_port: int,
                 cafile: Path, certfile: Path, keyfile: Path) -> None:
        self.host, self.tls_port, self.plain_port = host, tls_port, plain_port
        self.log = workdir / "mosquitto.log"
        conf = workdir / "mosquitto.conf"
        lines = [
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {tls_port} {host}",
            f"cafile {cafile}",
            f"certfile {certfile}",
            f"keyfile {keyfile}",
            f"listener {plain_port} {host}",
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # mosquitto drops to 'mosquitto' otherwise and cannot read the key
        conf.write_text("\n".join(lines) + "\n")
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self._log_file, stderr=self._log_file)
        try:
            wait_port(host, plain_port, proc=self.proc)
            wait_port(host, tls_port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


# ---------------------------------------------------------------------------------- hub simulator
def _merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch as IoT Hub applies it to a twin: None deletes."""
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


@dataclass
class SimMessage:
    output: str | None
    body: Any
    properties: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class HubSimulator:
    """The IoT Hub side of one module identity's twin and outputs, over the broker's plain listener.

    Like IoT Hub, it keeps no desired-patch notification for a disconnected module (QoS 0), so a module
    must read the twin on reconnect to catch up.
    """

    def __init__(self, host: str, port: int, device: str, module: str) -> None:
        import paho.mqtt.client as mqtt

        self.device, self.module = device, module
        self.desired: dict[str, Any] = {"$version": 1}
        self.reported: dict[str, Any] = {"$version": 1}
        self.reported_patches: list[tuple[float, dict[str, Any]]] = []
        self.messages: list[SimMessage] = []
        self.twin_gets = 0
        self.desired_set_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._events_prefix = f"devices/{device}/modules/{module}/messages/events/"
        self._subscribed = threading.Event()
        self._client = mqtt.Client(client_id=f"hubsim-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self) -> HubSimulator:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("hub simulator could not subscribe")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, _rc: int) -> None:
        client.subscribe([
            ("$iothub/twin/GET/#", 0),
            ("$iothub/twin/PATCH/properties/reported/#", 0),
            (self._events_prefix + "#", 0),
        ])

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        topic: str = msg.topic
        if topic.startswith("$iothub/twin/GET/"):
            rid = dict(parse_qsl(topic.split("?", 1)[1]))["$rid"]
            with self._lock:
                self.twin_gets += 1
                body = json.dumps({"desired": self.desired, "reported": self.reported})
            client.publish(f"$iothub/twin/res/200/?$rid={rid}", body, qos=0)
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            rid = dict(parse_qsl(topic.split("?", 1)[1]))["$rid"]
            patch = json.loads(msg.payload)
            with self._lock:
                _merge(self.reported, patch)
                self.reported["$version"] += 1
                version = self.reported["$version"]
                self.reported_patches.append((time.monotonic(), patch))
            client.publish(f"$iothub/twin/res/204/?$rid={rid}&$version={version}", b"", qos=0)
        elif topic.startswith(self._events_prefix):
            props = dict(parse_qsl(topic[len(self._events_prefix):]))
            try:
                body: Any = json.loads(msg.payload)
            except ValueError:
                body = msg.payload
            with self._lock:
                self.messages.append(SimMessage(props.get("$.on"), body, props))

    def set_desired(self, patch: dict[str, Any]) -> int:
        """Change desired properties as the service would, and notify the module. Returns $version."""
        with self._lock:
            _merge(self.desired, patch)
            self.desired["$version"] += 1
            version = int(self.desired["$version"])
            self.desired_set_at[version] = time.monotonic()
        body = json.dumps({**patch, "$version": version})
        self._client.publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, qos=0)
        return version

    def notify_desired(self, patch: dict[str, Any], version: int) -> None:
        """Send a desired-patch notification carrying ``version`` without changing the twin: a late or
        repeated notification (QoS 0 over a reconnect), as the module may receive from IoT Hub."""
        body = json.dumps({**patch, "$version": version})
        self._client.publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, qos=0)

    def reported_copy(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.reported)

    def status(self) -> dict[str, Any]:
        return dict(self.reported_copy().get("ModelUpdate") or {})

    def outputs(self, name: str) -> list[SimMessage]:
        with self._lock:
            return [m for m in self.messages if m.output == name]

    def states(self) -> list[str]:
        """Every ModelUpdate.State reported so far, in order."""
        with self._lock:
            patches = [p for _, p in self.reported_patches]
        return [p["ModelUpdate"]["State"] for p in patches
                if isinstance(p.get("ModelUpdate"), dict) and "State" in p["ModelUpdate"]]

    async def wait_status(
        self, state: str, version: int | None = None, within: float = 15.0
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status()
            if status.get("State") == state and (version is None or status.get("DesiredVersion") == version):
                return status
            return None

        return await eventually(
            check, within, lambda: f"ModelUpdate.State == {state!r} (version {version}); now {self.status()}"
        )


@dataclass
class IotHub:
    ip: str
    ca_file: Path
    proxy: FaultProxy
    sim: HubSimulator
    broker: Mosquitto
    device: str = "dev1"
    module: str = "loader"

    @property
    def connection_string(self) -> str:
        return (f"HostName={self.ip};DeviceId={self.device};ModuleId={self.module};"
                "SharedAccessKey=dGVzdGtleXRlc3RrZXl0ZXN0a2V5dGVzdGtleQ==")

    @property
    def env(self) -> dict[str, str]:
        return {"EDGELOADER_CA_CERT": str(self.ca_file)}


@pytest.fixture
def iot_hub(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA) -> Iterator[IotHub]:
    binary = require_tool("mosquitto", Path("/usr/sbin/mosquitto"))
    workdir = tmp_path_factory.mktemp("mqtt")
    ip = random_loopback_ip()
    cert, key = test_ca.issue(ip)
    (workdir / "ca.pem").write_bytes(test_ca.pem)
    (workdir / "server.pem").write_bytes(cert)
    (workdir / "server.key").write_bytes(key)
    (workdir / "server.key").chmod(0o600)
    broker = Mosquitto(binary, workdir, ip, free_port(ip), free_port(ip),
                       workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    proxy = sim = None
    try:
        proxy = FaultProxy(ip, MQTT_PORT, ip, broker.tls_port).start()
        sim = HubSimulator(ip, broker.plain_port, "dev1", "loader").start()
        yield IotHub(ip, workdir / "ca.pem", proxy, sim, broker)
    finally:
        if sim is not None:
            sim.stop()
        if proxy is not None:
            proxy.stop()
        broker.stop()


# ----------------------------------------------------------------------------------------- azurite
@dataclass
class Azurite:
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.endpoint};")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    require_tool("node")
    binary = require_tool("azurite-blob", TOOLS / "node_modules" / ".bin" / "azurite-blob")
    workdir = tmp_path_factory.mktemp("azurite")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
    )
    try:
        wait_port("127.0.0.1", port, timeout=20, proc=proc)
        yield Azurite("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class BlobStore:
    """One container in Azurite, with real SAS URLs (optionally pointed at a fault proxy)."""

    def __init__(self, azurite: Azurite) -> None:
        from azure.storage.blob import BlobServiceClient

        self.azurite = azurite
        self.container = f"models-{uuid.uuid4().hex[:12]}"
        self.service = BlobServiceClient.from_connection_string(azurite.connection_string)
        self.service.create_container(self.container)

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Upload in one shot; returns the blob's properties (etag, content_settings.content_md5)."""
        blob = self.service.get_blob_client(self.container, name)
        blob.upload_blob(data, overwrite=True)
        return dict(blob.get_blob_properties())

    async def aupload(self, name: str, data: bytes) -> dict[str, Any]:
        return await asyncio.to_thread(self.upload, name, data)

    def sas_url(self, name: str, *, expires_in: float = 3600, via: FaultProxy | None = None) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        now = dt.datetime.now(dt.UTC)
        token = generate_blob_sas(
            AZURITE_ACCOUNT, self.container, name, account_key=AZURITE_KEY,
            permission=BlobSasPermissions(read=True),
            start=now - dt.timedelta(hours=2), expiry=now + dt.timedelta(seconds=expires_in),
        )
        url = f"{self.azurite.endpoint}/{self.container}/{name}?{token}"
        if via is not None:
            parts = urlsplit(url)
            url = urlunsplit((parts.scheme, via.address, parts.path, parts.query, ""))
        return url


@pytest.fixture
def blob_store(azurite: Azurite) -> BlobStore:
    return BlobStore(azurite)


@pytest.fixture
def blob_proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with fault_proxy(azurite.host, azurite.port) as proxy:
        yield proxy


# ------------------------------------------------------------------------------------- blob server
@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]


@dataclass
class Blob:
    data: bytes
    etag: str


class BlobServer:
    """HTTP blobs on loopback, served by aiohttp, with the answers some servers give and Azurite never
    does. By default it behaves like Azure Blob Storage: ``Range: bytes=N-`` gets a 206 with
    ``Content-Range``, a stale ``If-Match`` a 412, a stale ``If-Range`` the whole new body (200), a range
    past the end a 416 with ``Content-Range: bytes */<size>``. Switches:

    - ``honour_range = False``: every GET is a plain 200 with the whole body (a server without ranges);
    - ``honour_conditions = False``: ``If-Match`` and ``If-Range`` are ignored;
    - ``chunked = True``: bodies go out chunked, without a Content-Length;
    - ``wrong_range = True``: a range request gets a 206 of the whole blob, saying so (``bytes 0-...``);
    - ``statuses``: statuses to answer the next requests with, bodiless, before serving again.

    Every request is recorded (``requests``: path and headers) as the server saw it, then passed to
    ``on_request`` (if set) before it is answered.
    """

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}
        self.requests: list[SeenRequest] = []
        self.honour_range = True
        self.honour_conditions = True
        self.chunked = False
        self.wrong_range = False
        self.statuses: list[int] = []
        self.on_request: Callable[[SeenRequest], None] | None = None
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def put(self, name: str, data: bytes, etag: str | None = None) -> str:
        """Store (or replace) a blob; returns its ETag (a new one unless given)."""
        blob = Blob(data, etag or f'"0x{uuid.uuid4().hex[:16].upper()}"')
        self.blobs[name] = blob
        return blob.etag

    def url(self, name: str, via: FaultProxy | None = None) -> str:
        """The blob's URL with a SAS-like query (the server ignores it), optionally through a proxy."""
        where = via.address if via is not None else f"{self.host}:{self.port}"
        return f"http://{where}/{name}?sv=2024-05-04&sr=b&sp=r&sig=NOT-A-REAL-SIGNATURE%3D"

    async def start(self) -> BlobServer:
        app = web.Application()
        app.router.add_get("/{name:.+}", self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port(self.host)
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        seen = SeenRequest(name, dict(request.headers))
        self.requests.append(seen)
        if self.on_request is not None:
            self.on_request(seen)
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        blob = self.blobs.get(name)
        if blob is None:
            return web.Response(status=404)
        data, etag = blob.data, blob.etag
        if self.honour_conditions and request.headers.get("If-Match", etag) != etag:
            return web.Response(status=412)
        start = 0
        ranged = self.honour_range and request.headers.get("Range", "").startswith("bytes=")
        if ranged and self.honour_conditions and request.headers.get("If-Range", etag) != etag:
            ranged = False  # changed since: the whole new body
        if ranged:
            first = request.headers["Range"].removeprefix("bytes=").split("-", 1)[0]
            start = 0 if self.wrong_range else int(first)
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"ETag": etag, "Accept-Ranges": "bytes" if self.honour_range else "none"}
        status = 200
        if ranged:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not self.chunked:
            return web.Response(status=status, body=body, headers=headers,
                                content_type="application/octet-stream")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
        await resp.write_eof()
        return resp


@pytest.fixture
async def blob_server() -> AsyncIterator[BlobServer]:
    server = await BlobServer().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def blob_server_proxy(blob_server: BlobServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``blob_server``."""
    with fault_proxy(blob_server.host, blob_server.port) as proxy:
        yield proxy
