"""The holes an outside probe found (issue 9), driven the way an attacker would: real packages
dropped in the inbox of a running service, real HTTP requests with unnormalised paths and hostile
bodies on loopback. Each test failed on the code before the fix."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
from aiohttp.test_utils import TestClient
from packages import ssd_files, write_folder, write_zip
from PIL import Image
from structlog.testing import capture_logs

from supervisor.app import build_app
from supervisor.fsutil import remove_tree
from supervisor.http.keys import ENGINE, EVENTS, PIPELINE, REPOSITORY
from supervisor.package.reader import PackageError
from supervisor.serving.membudget import BudgetExceeded, BudgetTimeout, MemoryBudget
from supervisor.settings import Settings
from supervisor.updates.repository import INSTALL_RECORD

if TYPE_CHECKING:
    from conftest import StartWatcher, WaitUntil

SECRET = "TOP-SECRET-CONTENT-1234"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file outside the data dir that no package may read."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(f"{SECRET}\nsecond line\n")
    return path


@pytest.fixture
async def client(aiohttp_client, settings: Settings) -> TestClient:
    return await aiohttp_client(build_app(settings.replace(body_timeout_seconds=1.0), services=False))


def rejections(client: TestClient) -> dict[str, str]:
    return {e.package: e.reason or "" for e in client.app[EVENTS].history if e.state == "rejected"}


async def drop_and_wait(client: TestClient, start_watcher: StartWatcher, wait_until: WaitUntil,
                        packages: dict[str, Path]) -> dict[str, str]:
    await start_watcher(client.app[PIPELINE])
    await wait_until(lambda: set(packages) <= set(rejections(client)), within=20,
                     what=f"rejections of {sorted(packages)} (have {sorted(rejections(client))})")
    return rejections(client)


def manifest_says(version: str, **changes: object) -> dict[str, bytes]:
    """A valid package whose model.json then says ``changes`` (an attacker's edit)."""
    files = ssd_files("leak", version)
    files["model.json"] = json.dumps({**json.loads(files["model.json"]), **changes}).encode()
    return files


def no_leak(reason: str, secret_file: Path) -> None:
    assert SECRET not in reason and str(secret_file) not in reason and "/etc/" not in reason, reason
    assert reason.isprintable() and len(reason) <= 200, reason


# -- 1. paths a package names ---------------------------------------------------------------------


async def test_manifest_paths_outside_the_package_are_refused_naming_the_key(
    client: TestClient, settings: Settings, secret_file: Path, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    inbox = settings.inbox_dir
    rel = os.path.relpath(secret_file, inbox / "x")
    packages = {
        "abs-labels.zip": write_zip(inbox / "abs-labels.zip", manifest_says("1", labels=str(secret_file))),
        "rel-labels.zip": write_zip(inbox / "rel-labels.zip", manifest_says("2", labels=rel)),
        "out-model.zip": write_zip(inbox / "out-model.zip", manifest_says("3", model="../../model.onnx")),
        "files-out.zip": write_zip(inbox / "files-out.zip", manifest_says("4", files={str(secret_file): "0" * 64})),
    }
    reasons = await drop_and_wait(client, start_watcher, wait_until, packages)
    assert "'labels'" in reasons["abs-labels.zip"] and "'labels'" in reasons["rel-labels.zip"]
    assert "'model'" in reasons["out-model.zip"]
    assert "'files'" in reasons["files-out.zip"]
    for name in packages:
        no_leak(reasons[name], secret_file)
        assert "checksum" not in reasons[name]
    assert client.app[REPOSITORY].versions() == [v for v in client.app[REPOSITORY].versions() if v.name != "leak"]
    # Still the bundled model, answering normally.
    resp = await client.post("/detect", data=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200
    assert (await resp.json())["model"]["name"] == "blazeface-short-range"


async def test_a_folder_package_with_a_symlink_or_hard_link_to_outside_is_refused(
    client: TestClient, settings: Settings, secret_file: Path, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    sym = write_folder(settings.inbox_dir / "sym-pkg", ssd_files("linked", "1"))
    (sym / "labels.txt").unlink()
    (sym / "labels.txt").symlink_to(secret_file)
    hard = write_folder(settings.inbox_dir / "hard-pkg", ssd_files("linked", "2"))
    (hard / "notes.txt").hardlink_to(secret_file)
    reasons = await drop_and_wait(client, start_watcher, wait_until, {"sym-pkg": sym, "hard-pkg": hard})
    assert "symlink" in reasons["sym-pkg"]
    assert "hard link" in reasons["hard-pkg"]
    for reason in reasons.values():
        no_leak(reason, secret_file)


def test_the_path_rule_refuses_every_way_out(tmp_path: Path) -> None:
    """member_path, the one rule for every name a package or an install record gives: each refusal
    names the key (never the target), and the names it accepts come back normalised."""
    from supervisor.package.paths import UnsafePackage, member_path

    folder = write_folder(tmp_path / "pkg", {"model.onnx": b"m", "sub/labels.txt": b"a\n"})
    (folder / "link").symlink_to(folder / "sub")
    (folder / "sub" / "nested").mkdir()
    key = "model.json 'model'"
    assert member_path(folder, "./sub/labels.txt", key) == "sub/labels.txt"
    assert member_path(folder, "sub\\labels.txt", key) == "sub/labels.txt"
    refused = {
        "": (UnsafePackage, "must be a file name inside the package"),
        "  ": (UnsafePackage, "must be a file name inside the package"),
        ".": (UnsafePackage, "must be a file name inside the package"),
        "../pkg/model.onnx": (UnsafePackage, "no absolute path, no '..'"),
        "/etc/passwd": (UnsafePackage, "no absolute path, no '..'"),
        "C:model.onnx": (UnsafePackage, "no absolute path, no '..'"),
        "a" * 300: (UnsafePackage, "cannot be read inside the package"),  # a name too long for the system
        "link/labels.txt": (UnsafePackage, "leads through a symlink"),
        "model.onnx/x": (PackageError, "names model.onnx/x, which is not in the package"),
        "missing.onnx": (PackageError, "names missing.onnx, which is not in the package"),
        "sub/nested": (UnsafePackage, "is not a regular file"),
    }
    for value, (kind, words) in refused.items():
        with pytest.raises(kind) as err:
            member_path(folder, value, key)
        assert words in str(err.value) and str(err.value).startswith(key), (value, str(err.value))
        assert "passwd" not in str(err.value) and str(tmp_path) not in str(err.value)
    for value in (None, 3, ["model.onnx"]):
        with pytest.raises(UnsafePackage, match="must be a file name inside the package"):
            member_path(folder, value, key)


async def test_a_stored_version_whose_install_record_points_outside_is_refused_at_load(
    client: TestClient, settings: Settings, secret_file: Path,
) -> None:
    pipeline = client.app[PIPELINE]
    version = await pipeline.process(write_zip(settings.inbox_dir / "ok.zip", ssd_files("ok", "1", activate=False)),
                                     source="inbox")
    assert version is not None
    record = json.loads((version.path / INSTALL_RECORD).read_text())
    record["labels_file"] = str(secret_file)
    (version.path / INSTALL_RECORD).write_text(json.dumps(record))
    resp = await client.post("/models/ok/1/activate")
    assert resp.status == 500
    message = (await resp.json())["error"]["message"]
    assert "install record" in message and "labels_file" in message
    no_leak(message, secret_file)
    assert (await (await client.get("/readyz")).json())["model"]["name"] == "blazeface-short-range"


def _ssd_with_external_data(location: str) -> dict[str, bytes]:
    """The test SSD whose first initializer says its bytes lie in ``location``."""
    model = onnx.load_from_string(ssd_files("ext", "1")["model.onnx"])
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data) + len(t.float_data))
    for name in ("raw_data", "float_data", "int32_data", "int64_data"):
        init.ClearField(name)
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    files = ssd_files("ext", "1")
    files["model.onnx"] = model.SerializeToString()
    meta = json.loads(files["model.json"])
    meta.pop("files")
    files["model.json"] = json.dumps(meta).encode()
    return files


async def test_onnx_external_data_outside_the_package_is_refused_before_the_runtime_reads_it(
    client: TestClient, settings: Settings, secret_file: Path, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    inbox = settings.inbox_dir
    packages = {
        "ext-rel.zip": write_zip(inbox / "ext-rel.zip", _ssd_with_external_data("../../../outside/secret.txt")),
        "ext-abs.zip": write_zip(inbox / "ext-abs.zip", _ssd_with_external_data(str(secret_file))),
    }
    reasons = await drop_and_wait(client, start_watcher, wait_until, packages)
    for reason in reasons.values():
        assert "external-data location" in reason, reason
        no_leak(reason, secret_file)
        assert str(settings.data_dir) not in reason


# -- 2. names in routes -----------------------------------------------------------------------------


async def raw_request(client: TestClient, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side path normalisation) and read the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        # Up to the end of the answer, not EOF: the server may linger to drain an unread body.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("Content-Length", "0"))), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("path", [
    "/models/%2e%2e/inbox/activate",
    "/models/..%2Finbox/x/activate",
    "/models/%2E%2E/staging/activate",
    "/models/.hidden/1/activate",
])
async def test_activate_refuses_names_that_leave_models(client: TestClient, settings: Settings, path: str) -> None:
    (settings.inbox_dir / INSTALL_RECORD).write_text("{}")  # would make inbox/ look like a version
    before = os.readlink(settings.current_link)
    status, _, body = await raw_request(
        client, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "not_found"
    assert os.readlink(settings.current_link) == before


async def test_v2_model_routes_refuse_traversal(client: TestClient) -> None:
    status, _, body = await raw_request(
        client, b"GET /v2/models/%2e%2e/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404, body


# -- 3. reasons that leak -------------------------------------------------------------------------


async def test_sidecars_never_echo_what_they_point_at(
    client: TestClient, settings: Settings, secret_file: Path, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    inbox = settings.inbox_dir
    linked = write_zip(inbox / "linked.zip", ssd_files("side", "1"))
    (inbox / "linked.zip.sha256").symlink_to(secret_file)
    binary = write_zip(inbox / "binary.zip", ssd_files("side", "2"))
    (inbox / "binary.zip.sha256").write_bytes(b"\x00\x01\xfe\xff\x1b[31m" * 20)
    big = write_zip(inbox / "big.zip", ssd_files("side", "3"))
    (inbox / "big.zip.sha256").write_bytes(b"a" * 1_000_000)
    reasons = await drop_and_wait(client, start_watcher, wait_until,
                                  {"linked.zip": linked, "binary.zip": binary, "big.zip": big})
    for reason in reasons.values():
        assert ".sha256" in reason, reason
        no_leak(reason, secret_file)
        assert "\x1b" not in reason and "aaaa" not in reason


async def test_an_oversized_manifest_is_refused_unread(
    client: TestClient, settings: Settings, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    files = ssd_files("fat", "1")
    meta = json.loads(files["model.json"])
    meta["description"] = os.urandom(1_500_000).hex()  # incompressible: no zip-bomb refusal first
    files["model.json"] = json.dumps(meta).encode()
    fat = write_zip(settings.inbox_dir / "fat.zip", files)
    reasons = await drop_and_wait(client, start_watcher, wait_until, {"fat.zip": fat})
    assert "model.json is" in reasons["fat.zip"] and "limit" in reasons["fat.zip"]


# -- 4. images that cost more memory than they weigh --------------------------------------------------


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 180, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _flat(fmt: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 150)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
async def test_small_files_that_decode_to_huge_images_are_413_before_decoding(client: TestClient, fmt: str) -> None:
    body = _flat(fmt, 7000)  # ~120-150 KB on the wire, under the 50 MP cap, ~800 MB to decode
    assert len(body) < 200_000
    resp = await client.post("/detect", data=body, headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 413
    message = (await resp.json())["error"]["message"]
    assert "MB" in message and "JPEG" in message


async def test_a_large_jpeg_is_still_served_through_draft_decoding(client: TestClient) -> None:
    resp = await client.post("/detect", data=_flat("JPEG", 7000), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["image"] == {"width": 7000, "height": 7000}


async def test_decodes_wait_for_memory_and_give_up_with_busy() -> None:
    budget = MemoryBudget(100, wait_seconds=0.2)
    with pytest.raises(BudgetExceeded):
        async with budget.reserve(101):
            pass
    order: list[str] = []
    async with budget.reserve(70):
        with pytest.raises(BudgetTimeout):
            async with budget.reserve(40):
                pass
        waiter = asyncio.create_task(_reserve_and_note(budget, 40, order))
        await asyncio.sleep(0.05)
        order.append("first released")
    await waiter
    assert order == ["first released", "second decoded"]
    assert budget.in_use == 0


async def test_a_request_that_finds_no_decode_memory_in_time_is_503_busy(
    aiohttp_client, settings: Settings, photo: bytes,
) -> None:
    """The API end of the budget: while other decodes hold all of it for longer than
    decode_wait_seconds, a request is answered 503 busy (retry later), not 500 or a hang."""
    client: TestClient = await aiohttp_client(build_app(settings.replace(decode_wait_seconds=0.3), services=False))
    budget = client.app[ENGINE].decode_budget
    async with budget.reserve(budget.limit):
        resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
        body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "busy", body
    assert "retry later" in body["error"]["message"]
    resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200  # the budget free again, it answers


async def _reserve_and_note(budget: MemoryBudget, amount: int, order: list[str]) -> None:
    async with budget.reserve(amount):
        order.append("second decoded")


# -- 5. multipart with a flood of parts --------------------------------------------------------------


async def test_a_multipart_flood_is_refused_at_the_part_cap(client: TestClient) -> None:
    boundary = "xx"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n'.encode()
    body = part * 100_000 + f"--{boundary}--\r\n".encode()
    health = asyncio.create_task(client.get("/healthz"))
    ctype = f"multipart/form-data; boundary={boundary}"
    # A file-like body: aiohttp warns that a large bytes body could block the client's event loop.
    resp = await client.post("/detect", data=io.BytesIO(body), headers={"Content-Type": ctype})
    assert resp.status == 400
    assert "more than 8 parts" in (await resp.json())["error"]["message"]
    assert (await health).status == 200


# -- 6. a folder nested a thousand deep ----------------------------------------------------------------


async def test_a_deeply_nested_folder_package_is_quarantined(
    request: pytest.FixtureRequest, client: TestClient, settings: Settings,
    start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    staging = settings.data_dir / "deep-build"
    deep = staging / "deep-pkg"
    write_folder(deep, ssd_files("deep", "1"))
    nested = deep
    for _ in range(1000):  # os.makedirs would itself hit the recursion limit
        nested = nested / "a"
        nested.mkdir()
    os.rename(deep, settings.inbox_dir / "deep-pkg")
    # Whatever happens, leave no 1000-deep tree for pytest's recursive clean-up of old runs.
    request.addfinalizer(lambda: remove_tree(settings.data_dir))
    with capture_logs() as logs:
        reasons = await drop_and_wait(client, start_watcher, wait_until, {"deep-pkg": deep})
    assert "levels deep" in reasons["deep-pkg"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not (settings.inbox_dir / "deep-pkg").exists()
    # The quarantined copy must be removable by the service (and must not be left for pytest's own
    # recursive clean-up of old temporary folders, which overflows the stack on it).
    entries = list(settings.quarantine_dir.iterdir())
    assert entries
    for entry in entries:
        remove_tree(entry)
    assert not list(settings.quarantine_dir.iterdir())


def test_remove_tree_takes_what_shutil_rmtree_cannot(tmp_path: Path) -> None:
    import shutil

    top = tmp_path / "top"
    top.mkdir()
    nested = top
    for _ in range(1200):
        nested = nested / "a"
        nested.mkdir()
    (nested / "leaf").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    (top / "link").symlink_to(outside)
    # Python's default limit, as in the service (conftest raises it for pytest's own clean-up).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(RecursionError):
            shutil.rmtree(top, ignore_errors=True)
        remove_tree(top)
    finally:
        sys.setrecursionlimit(limit)
        remove_tree(top)
    assert not top.exists()
    assert (outside / "keep").read_bytes() == b"k"  # a symlink inside is removed, not followed


# -- 7. slow bodies, disconnects, what responses give away ------------------------------------------


async def test_a_body_that_never_arrives_is_408(client: TestClient) -> None:
    status, _, body = await raw_request(
        client, b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n"
                b"Connection: close\r\n\r\n\xff\xd8\xff")
    assert status == 408, body
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_a_client_that_hangs_up_mid_body_is_no_server_error(client: TestClient) -> None:
    with capture_logs() as logs:
        _reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
                     b"\xff\xd8\xff")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        for _ in range(50):  # the server notices the hang-up asynchronously
            if any(e["event"] in ("client_disconnected", "request") for e in logs):
                break
            await asyncio.sleep(0.05)
    assert not [e for e in logs if e["event"] == "unhandled_error"], logs
    assert [e for e in logs if e["event"] == "client_disconnected"], logs


async def test_responses_do_not_advertise_versions_or_object_reprs(client: TestClient) -> None:
    resp = await client.post("/detect", data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
                             headers={"Content-Type": "image/png"})
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    assert " at 0x" not in message and "object" not in message, message
    server = resp.headers.get("Server", "")
    assert "aiohttp" not in server and "Python" not in server, server
