"""The HTTP API against the real app, the real bundled BlazeFace model and a real photo."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from PIL import Image
from skimage import data as skdata

from supervisor.app import build_app
from supervisor.http.keys import ENGINE
from supervisor.http.openapi import openapi_document
from supervisor.settings import load_settings


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


ASTRONAUT = jpeg(skdata.astronaut())


@pytest.fixture
async def client(aiohttp_client, tmp_path: Path) -> TestClient:
    settings = load_settings({"data_dir": tmp_path, "max_body_bytes": 3_000_000, "twin": "off"}, env={})
    return await aiohttp_client(build_app(settings, services=False))


async def detect(client: TestClient, body: bytes, ctype: str = "image/jpeg", query: str = "") -> tuple[int, dict]:
    # A file-like body: aiohttp warns that a large bytes body could block the client's event loop.
    resp = await client.post(f"/detect{query}", data=io.BytesIO(body), headers={"Content-Type": ctype})
    return resp.status, await resp.json()


async def test_detect_finds_the_one_face_on_a_real_photo(client: TestClient) -> None:
    status, body = await detect(client, ASTRONAUT)
    assert status == 200, body
    assert body["model"] == {"name": "blazeface-short-range", "version": "1"}
    assert body["image"] == {"width": 512, "height": 512}
    [face] = body["detections"]
    assert face["label"] == "face" and face["class_id"] == 0
    assert face["score"] > 0.8
    box = face["box"]
    # The astronaut's face spans about x 180..265, y 70..170 in the 512x512 photo.
    assert 150 < box["xmin"] < 200 and 245 < box["xmax"] < 295
    assert 40 < box["ymin"] < 100 and 145 < box["ymax"] < 200
    assert box["xmin"] == pytest.approx(face["box_normalized"]["xmin"] * 512, abs=0.2)
    assert set(body["timing_ms"]) >= {"decode", "inference"}


async def test_blazeface_detections_carry_their_six_keypoints_in_pixels(client: TestClient) -> None:
    _, body = await detect(client, ASTRONAUT)
    [face] = body["detections"]
    box, points = face["box"], face["keypoints"]
    # Right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion (MediaPipe's order).
    assert len(points) == 6 and all(set(p) == {"x", "y"} for p in points)
    right_eye, left_eye, nose, mouth = points[:4]
    assert right_eye["x"] < nose["x"] < left_eye["x"]  # the subject's right is the image's left
    assert max(right_eye["y"], left_eye["y"]) < nose["y"] < mouth["y"]
    for p in points[:4]:
        assert box["xmin"] < p["x"] < box["xmax"] and box["ymin"] < p["y"] < box["ymax"]


async def test_png_multipart_and_octet_stream_give_the_same_face(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "PNG")
    _, as_png = await detect(client, buf.getvalue(), "image/png")
    _, as_octets = await detect(client, buf.getvalue(), "application/octet-stream")
    form = FormData()
    form.add_field("image", buf.getvalue(), filename="a.png", content_type="image/png")
    resp = await client.post("/detect", data=form)
    as_form = await resp.json()
    assert resp.status == 200
    assert as_png["detections"] == as_octets["detections"] == as_form["detections"]
    assert len(as_png["detections"]) == 1


async def test_query_filters(client: TestClient) -> None:
    _, none_above = await detect(client, ASTRONAUT, query="?threshold=0.9999")
    assert none_above["detections"] == []
    _, other_label = await detect(client, ASTRONAUT, query="?labels=person,car")
    assert other_label["detections"] == []
    _, face_only = await detect(client, ASTRONAUT, query="?labels=face&max=1&threshold=0.1")
    assert len(face_only["detections"]) == 1


async def test_score_speaks_the_video_analytics_extension_format(client: TestClient) -> None:
    resp = await client.post("/score", data=ASTRONAUT, headers={"Content-Type": "image/jpeg"})
    body = await resp.json()
    [inference] = body["inferences"]
    assert inference["type"] == "entity"
    assert inference["entity"]["tag"]["value"] == "face"
    assert inference["entity"]["tag"]["confidence"] > 0.8
    box = inference["entity"]["box"]
    assert 0.3 < box["l"] < 0.4 and 0.1 < box["t"] < 0.2 and 0.1 < box["w"] < 0.25


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: a decompression bomb must be refused unread."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"", "image/jpeg", 400, "bad_request"),
        (b"this is not an image at all", "image/jpeg", 400, "bad_request"),
        (ASTRONAUT[: len(ASTRONAUT) // 2], "image/jpeg", 400, "bad_request"),
        (ASTRONAUT[:200], "image/jpeg", 400, "bad_request"),
        (huge_png_header(100_000, 100_000), "image/png", 413, "payload_too_large"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif", 415, "unsupported_media_type"),
        (ASTRONAUT, "text/plain", 415, "unsupported_media_type"),
        (b"\0" * 3_100_000, "image/jpeg", 413, "payload_too_large"),
    ],
    ids=["empty", "garbage", "truncated-half", "truncated-header", "bomb", "gif", "text", "over-limit"],
)
async def test_bad_input_gets_a_json_4xx_and_the_service_keeps_serving(
    client: TestClient, body: bytes, ctype: str, status: int, code: str
) -> None:
    got_status, got = await detect(client, body, ctype)
    assert got_status == status, got
    assert got["error"]["code"] == code
    assert got["error"]["message"]
    ok_status, ok = await detect(client, ASTRONAUT)
    assert ok_status == 200 and len(ok["detections"]) == 1


async def test_the_body_limit_is_the_apis_own_413_at_max_body_bytes(client: TestClient) -> None:
    """``max_body_bytes`` (3,000,000 here): one byte over is refused before the body is read, with the
    API's JSON error naming both sizes; the limit itself and one under it are read (and then refused for
    what they are, not for their size). A body without a Content-Length (chunked) gets the same 413 once
    it grows past the limit."""
    limit = 3_000_000

    async def post(body: bytes) -> tuple[int, dict]:
        # A file-like body: aiohttp warns that a large bytes body could block the client's event loop.
        resp = await client.post("/detect", data=io.BytesIO(body), headers={"Content-Type": "image/jpeg"})
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()

    status, body = await post(b"\0" * (limit + 1))
    assert status == 413, body
    assert body == {"error": {"code": "payload_too_large",
                              "message": f"body of {limit + 1} bytes is over the {limit}-byte limit"}}
    for size in (limit, limit - 1):
        status, body = await post(b"\0" * size)
        assert status == 400 and body["error"]["code"] == "bad_request", (size, body)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"\0" * 1_000_000

    resp = await client.post("/detect", data=chunks(), headers={"Content-Type": "image/jpeg"})
    body = await resp.json()
    assert resp.status == 413 and body["error"]["code"] == "payload_too_large", body
    assert str(limit) in body["error"]["message"]


@pytest.mark.parametrize("query", ["?threshold=abc", "?threshold=1.5", "?max=0", "?max=two"])
async def test_bad_query_values_are_400(client: TestClient, query: str) -> None:
    status, body = await detect(client, ASTRONAUT, query=query)
    assert status == 400 and body["error"]["code"] == "bad_request"


async def test_gif_sent_as_octet_stream_is_415(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    status, body = await detect(client, buf.getvalue(), "application/octet-stream")
    assert status == 415, body


async def test_health_readiness_and_open_inference_routes(client: TestClient) -> None:
    paths = ("/healthz", "/v2/health/live", "/readyz", "/v2/health/ready", "/v2/models/blazeface-short-range/ready")
    for path in paths:
        resp = await client.get(path)
        assert resp.status == 200, path
    meta = await (await client.get("/v2/models/blazeface-short-range")).json()
    assert meta["inputs"][0]["shape"] == [1, 128, 128, 3]
    assert {o["name"] for o in meta["outputs"]} == {"regressors", "classificators"}
    missing = await client.get("/v2/models/nope")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"


async def test_no_model_means_503(client: TestClient) -> None:
    app: web.Application = client.app  # type: ignore[assignment]
    app[ENGINE]._active = None
    resp = await client.get("/readyz")
    assert resp.status == 503
    status, body = await detect(client, ASTRONAUT)
    assert status == 503 and body["error"]["code"] == "no_model"


async def test_models_lists_the_active_version_with_handler_and_hash(client: TestClient) -> None:
    body = await (await client.get("/models")).json()
    assert body["active"]["name"] == "blazeface-short-range"
    assert body["active"]["handler"] == "mediapipe_ssd"
    assert len(body["active"]["sha256"]) == 64
    [version] = body["versions"]
    assert version["state"] == "active" and version["sha256"] == body["active"]["sha256"]


async def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/detect")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_request_id_is_echoed(client: TestClient) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert resp.headers["X-Request-ID"] == "abc123"


def test_openapi_lists_exactly_the_routes(tmp_path: Path) -> None:
    app = build_app(load_settings({"data_dir": tmp_path}, env={}), services=False)
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            served.add((route.method.lower(), path))
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented


def test_settings_precedence(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    conf.write_text('port = 7000\nworkers = 3\n')
    s = load_settings({"port": 9000}, env={"EDGELOADER_PORT": "8000", "EDGELOADER_WORKERS": "2"}, config_file=conf)
    assert s.port == 9000 and s.workers == 2
    assert load_settings(env={}, config_file=conf).workers == 3
    with pytest.raises(ValueError, match="unknown setting"):
        bad = tmp_path / "bad.toml"
        bad.write_text("nope = 1\n")
        load_settings(env={}, config_file=bad)


def test_built_in_defaults_match_the_documented_settings_file() -> None:
    """An installed wheel has no config/ folder and falls back to the dataclass defaults."""
    import tomllib

    from supervisor.settings import Settings

    documented = tomllib.loads((Path(__file__).parents[1] / "config" / "settings.toml").read_text())
    built_in = Settings()
    for key, value in documented.items():
        if key == "data_dir":
            assert Path(value) == built_in.data_dir
        else:
            assert getattr(built_in, key) == value, key


def test_unwritable_data_dir_is_a_clear_one_line_error(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    if os.getuid() == 0:
        data = Path("/proc/edgeloader-not-writable")  # not even root can create folders in /proc
    else:
        data = tmp_path / "ro"
        data.mkdir(mode=0o500)
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "serve", "--data-dir", str(data), "--port", "0", "--twin", "off"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot write the data dir" in proc.stderr and "Traceback" not in proc.stderr


async def test_model_flag_imports_and_activates_a_package_and_keeps_the_users_file(
    aiohttp_client, tmp_path: Path
) -> None:
    from packages import ssd_files, write_zip

    package = write_zip(tmp_path / "drop" / "tiny-ssd.zip", ssd_files("tiny-ssd", "7"))
    settings = load_settings({"data_dir": tmp_path / "data", "twin": "off"}, env={})
    client = await aiohttp_client(build_app(settings, import_path=package, services=False))
    body = await (await client.get("/models")).json()
    assert body["active"]["name"] == "tiny-ssd" and body["active"]["version"] == "7"
    assert package.is_file(), "--model must not consume the operator's own file"
    assert not any((tmp_path / "data" / "staging").iterdir()), "the import copy is cleaned up"


async def test_model_flag_with_a_bad_package_refuses_to_start(tmp_path: Path) -> None:
    from supervisor.app import ImportFailed, import_model
    from supervisor.serving.engine import Engine
    from supervisor.updates.events import EventBus
    from supervisor.updates.pipeline import Pipeline
    from supervisor.updates.repository import Repository

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    settings = load_settings({"data_dir": tmp_path / "data"}, env={})
    repo = Repository(settings.data_dir)
    repo.ensure_layout()
    engine = Engine(workers=1)
    try:
        pipeline = Pipeline(settings, repo, engine, EventBus())
        await pipeline.start()
        with pytest.raises(ImportFailed, match="not a valid zip"):
            await import_model(pipeline, bad)
        assert engine.active is not None and engine.active.info.name == "blazeface-short-range"
    finally:
        engine.shutdown()
