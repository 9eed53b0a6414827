"""The status page's HTML, ``/annotate`` and the pending work in ``/models``, over HTTP against the real
app (the browser test is test_status_page_browser.py)."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path

import numpy as np
from aiohttp.test_utils import TestClient
from packages import ssd_files, write_zip, zip_bytes
from PIL import Image

from supervisor.app import build_app
from supervisor.http.keys import EVENTS, PIPELINE
from supervisor.http.pictures import draw_detections
from supervisor.settings import Settings, load_settings
from supervisor.updates.events import ModelEvent

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GREEN = np.array([0, 230, 64])  # the first class's colour (pictures._PALETTE)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)


async def test_annotate_draws_the_box_where_detect_found_the_face(
    aiohttp_client, settings: Settings, photo: bytes
) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    found = await (await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})).json()
    resp = await client.post("/annotate", data=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200 and resp.content_type == "image/jpeg"
    assert resp.headers["X-Detections"] == "1" and resp.headers["X-Model"] == "blazeface-short-range/1"
    drawn, original = decode(await resp.read()), decode(photo)
    assert drawn.shape == original.shape == (512, 512, 3)
    box = found["detections"][0]["box"]
    # The left edge of the box, half-way down: the box colour now, not the photo's.
    x, y = round(box["xmin"]) + 1, round((box["ymin"] + box["ymax"]) / 2)
    assert np.abs(drawn[y, x] - GREEN).max() < 60, drawn[y, x]
    assert np.abs(original[y, x] - GREEN).max() > 60
    # Far from the box the picture is the photo.
    assert np.abs(drawn[450, 60] - original[450, 60]).max() < 20

    empty = await client.post("/annotate?threshold=0.9999", data=photo, headers={"Content-Type": "image/jpeg"})
    assert empty.headers["X-Detections"] == "0"
    assert np.abs(decode(await empty.read())[y, x] - original[y, x]).max() < 30

    bad = await client.post("/annotate", data=b"no image", headers={"Content-Type": "image/jpeg"})
    assert bad.status == 400 and (await bad.json())["error"]["code"] == "bad_request"
    bad = await client.post("/annotate?max=0", data=photo, headers={"Content-Type": "image/jpeg"})
    assert bad.status == 400


def test_keypoints_are_drawn_and_big_pictures_shrink() -> None:
    image = Image.new("RGB", (4000, 2000), (255, 255, 255))
    det = {"label": "face", "class_id": 0, "score": 0.9,
           "box": {"xmin": 1000.0, "ymin": 500.0, "xmax": 2000.0, "ymax": 1500.0},
           "keypoints": [{"x": 1500.0, "y": 1000.0}, [3000.0, 1800.0]]}
    out = decode(draw_detections(image, (4000, 2000), [det]))
    assert out.shape == (960, 1920, 3)  # the long side at MAX_SIDE
    for x, y in ((720, 480), (1440, 864)):  # both keypoints, scaled by 0.48
        assert np.abs(out[y, x] - GREEN).max() < 60, (x, y, out[y, x])
    assert (out[700, 1800] > 240).all()


async def test_the_page_shows_the_state_escaped_and_locked_down(aiohttp_client, settings: Settings) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline = client.app[PIPELINE]
    await pipeline.process(write_zip(settings.inbox_dir / "2.zip", ssd_files("tiny-ssd", "2", activate=False)),
                           source="inbox")
    hostile = settings.inbox_dir / "<img src=x onerror=alert(1)>.zip"
    hostile.write_bytes(b"not a zip at all")
    await pipeline.process(hostile, source="inbox")

    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert "blazeface-short-range" in page and 'data-name="tiny-ssd" data-version="2"' in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.zip" in page
    assert "not a valid zip" in page
    assert "http" not in re.sub(r'href="/[^"]*"|http://www\.w3\.org', "", page), "no asset from elsewhere"

    part = await client.get("/?part=state")
    assert part.status == 200 and "<html" not in await part.text()


async def test_with_scope_all_the_page_loads_but_shows_state_only_with_the_token(
    aiohttp_client, tmp_path: Path
) -> None:
    env = {"EDGELOADER_API_TOKEN": "t0ken", "EDGELOADER_API_TOKEN_SCOPE": "all"}
    settings = load_settings({"data_dir": tmp_path, "twin": "off"}, env=env)
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    page = await client.get("/")
    assert page.status == 200
    text = await page.text()
    assert "API token needed" in text and "blazeface-short-range" not in text
    assert (await client.get("/?part=state")).status == 401
    state = await client.get("/?part=state", headers={"Authorization": "Bearer t0ken"})
    assert state.status == 200 and "blazeface-short-range" in await state.text()
    assert (await client.get("/models")).status == 401
    assert (await client.post("/", data=b"")).status in (401, 405)


async def test_models_shows_waiting_packages_and_downloads_with_iso_times(
    aiohttp_client, tmp_path: Path, wait_until
) -> None:
    settings = load_settings({"data_dir": tmp_path / "data", "twin": "off", "settle_seconds": 0.2,
                              "incomplete_timeout_seconds": 60}, env={})
    client: TestClient = await aiohttp_client(build_app(settings))  # with the folder watcher
    # A zip whose copy stopped half-way: no central directory yet, so it waits for the rest.
    whole = zip_bytes(ssd_files("tiny-ssd", "3"))
    half = whole[: len(whole) // 2]
    (settings.inbox_dir / "copying.zip").write_bytes(half)

    async def models() -> dict:
        return await (await client.get("/models")).json()

    async def waiting() -> list:
        return (await models())["pending"]["packages"]

    found: list = []

    async def incomplete() -> bool:
        found[:] = await waiting()
        return bool(found) and found[0]["state"] == "incomplete"

    deadline = time.monotonic() + 10
    while not await incomplete():
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)
    [entry] = found
    assert entry["package"] == "copying.zip" and entry["source"] == "inbox" and entry["bytes"] == len(half)
    assert ISO_UTC.match(entry["since"]), entry

    # A download under way, as the twin's reconciler reports it.
    events = client.app[EVENTS]
    now = time.time()
    events.publish(ModelEvent("downloading", "twin", "ssd-9.zip", desired_version=4, bytes_done=1000,
                              bytes_total=10_000, at=now - 2))
    events.publish(ModelEvent("downloading", "twin", "ssd-9.zip", desired_version=4, bytes_done=5000,
                              bytes_total=10_000, at=now))
    await asyncio.sleep(0.05)
    body = await models()
    [download] = body["pending"]["downloads"]
    assert (download["package"], download["bytes_done"], download["bytes_total"]) == ("ssd-9.zip", 5000, 10_000)
    assert download["bytes_per_second"] == 2000 and ISO_UTC.match(download["since"])
    events.publish(ModelEvent("download_failed", "twin", "ssd-9.zip", desired_version=4, reason="HTTP 403"))
    await asyncio.sleep(0.05)
    body = await models()
    assert body["pending"]["downloads"] == []

    page = await (await client.get("/")).text()
    assert "copying.zip" in page

    # Times are ISO 8601 UTC strings everywhere in /models.
    assert ISO_UTC.match(body["twin"]["since"])
    assert all(ISO_UTC.match(e["at"]) for e in body["events"])
    assert all(ISO_UTC.match(v["installed_at"]) for v in body["versions"])

    # The rest of the copy arrives: the package is taken and no longer waits.
    (settings.inbox_dir / "copying.zip").write_bytes(whole)
    await wait_until(lambda: client.app[PIPELINE].engine.active.info.name == "tiny-ssd", within=10)
    assert await waiting() == []
