"""The status page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by
scripts/install-test-services.sh; Selenium drives it, no browser is downloaded) against the real service on
loopback: the active model is shown, a photo chosen in the test box comes back with its box drawn, and the
activate button switches the model. A screenshot is written under the test's temp dir.

Without Chromium the test skips, unless ``CI`` is set: there it fails (CI must have run ``make services``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from packages import ssd_files, write_zip

from supervisor.app import build_app
from supervisor.http.keys import ENGINE, EVENTS, PIPELINE, TWIN_STATUS
from supervisor.settings import load_settings
from supervisor.twin.reporter import status_patch
from supervisor.updates.events import ModelEvent

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
GREEN = (0, 230, 64)  # the box colour of the first class (supervisor/http/pictures.py)
TOKEN = "browser-test-token"

# Draws the shown picture on a canvas and reads one pixel (the picture is a same-origin blob: readable).
_PIXEL_JS = """
const img = document.getElementById('annotated');
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
return [img.naturalWidth, img.naturalHeight, Array.from(ctx.getImageData(arguments[0], arguments[1], 1, 1).data)];
"""


def _browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"no {', '.join(missing)}: run `make services` (scripts/install-test-services.sh)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _drive(url: str, image: Path, out: Path) -> dict[str, Any]:
    """The browser session (blocking: run in a thread while the server answers on the test's loop)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1300", f"--user-data-dir={out / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    seen: dict[str, Any] = {}
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        seen["active_before"] = driver.find_element(By.CSS_SELECTOR, "#active dl").text
        seen["pending"] = driver.find_element(By.ID, "pending").text
        seen["twin"] = driver.find_element(By.ID, "twin").text

        # The token, as a person types it: kept in the tab's sessionStorage, sent as a Bearer header.
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()

        # Choose the photo in the test box; /annotate's picture comes back into the page.
        driver.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "figure").get_attribute("data-state") in ("done", "error"))
        seen["message"] = driver.find_element(By.ID, "message").text
        seen["found"] = driver.find_element(By.ID, "found").text
        box = re.search(r"face [\d.]+ at \((\d+), (\d+)\)\u2013\((\d+), (\d+)\)", seen["found"])
        assert box is not None, seen
        x0, y0, x1, y1 = map(int, box.groups())
        seen["box"] = (x0, y0, x1, y1)
        seen["edge_pixel"] = driver.execute_script(_PIXEL_JS, x0 + 1, (y0 + y1) // 2)
        seen["inside_pixel"] = driver.execute_script(_PIXEL_JS, (x0 + x1) // 2, (y0 + y1) // 2)
        seen["screenshot"] = out / "status-page.png"
        driver.save_screenshot(str(seen["screenshot"]))

        # Activate the stored tiny-ssd 2: the page says so and shows it as the active model.
        button = driver.find_element(By.CSS_SELECTOR, 'button.activate[data-name="tiny-ssd"][data-version="2"]')
        button.click()
        wait.until(lambda d: "tiny-ssd" in d.find_element(By.CSS_SELECTOR, "#active dl").text)
        seen["message_after"] = driver.find_element(By.ID, "message").text
        seen["active_after"] = driver.find_element(By.CSS_SELECTOR, "#active dl").text
        seen["browser"] = driver.capabilities.get("browserVersion")
    finally:
        driver.quit()
    return seen


async def test_the_status_page_in_chromium(aiohttp_server, tmp_path: Path, photo: bytes) -> None:
    _browser()
    settings = load_settings({"data_dir": tmp_path / "data", "twin": "off"}, env={"EDGELOADER_API_TOKEN": TOKEN})
    app = build_app(settings, services=False)
    server = await aiohttp_server(app, host="127.0.0.1")
    pipeline = app[PIPELINE]
    await pipeline.process(write_zip(settings.inbox_dir / "tiny-ssd-2.zip", ssd_files("tiny-ssd", "2", activate=False)),
                           source="inbox")
    notes = settings.inbox_dir / "notes.zip"
    notes.write_bytes(b"These are my notes, not a model.\n")
    await pipeline.process(notes, source="inbox")
    # A download under way and the twin's last report, as the twin service publishes and records them.
    for done, ago in ((1_000_000, 4.0), (3_000_000, 0.0)):
        app[EVENTS].publish(ModelEvent("downloading", "twin", "ssd-3.zip", desired_version=7, bytes_done=done,
                                       bytes_total=7_500_000, at=time.time() - ago))
    app[TWIN_STATUS].set("connected", mode="edge")
    app[TWIN_STATUS].reported(status_patch("downloading", file_name="ssd-3.zip", desired_version=7,
                                           bytes_done=3_000_000, bytes_total=7_500_000)["ModelUpdate"])
    await asyncio.sleep(0.05)  # the observer has seen the events
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(photo)

    seen = await asyncio.to_thread(_drive, str(server.make_url("/")), image, tmp_path)
    print(f"\nstatus page screenshot ({seen['browser']}): {seen['screenshot']}")

    assert "blazeface-short-range" in seen["active_before"] and "Version\n1" in seen["active_before"]
    assert "ssd-3.zip" in seen["pending"] and "40%" in seen["pending"] and "488.3 KB/s" in seen["pending"], seen
    assert "connected" in seen["twin"] and "State: downloading" in seen["twin"], seen
    # One face, its box drawn in the picture: the box colour on its left edge, the photo inside it.
    assert seen["found"].startswith("1 found by blazeface-short-range 1"), seen
    width, height, edge = seen["edge_pixel"]
    assert (width, height) == (512, 512)
    assert max(abs(a - b) for a, b in zip(edge[:3], GREEN, strict=True)) < 60, seen
    _, _, inside = seen["inside_pixel"]
    assert max(abs(a - b) for a, b in zip(inside[:3], GREEN, strict=True)) > 60, seen
    # The activate button switched the model, with the token the page was given.
    assert "Activated: tiny-ssd 2 is active" in seen["message_after"], seen
    assert "tiny-ssd" in seen["active_after"] and "onnx_ssd" in seen["active_after"]
    assert app[ENGINE].active.info.name == "tiny-ssd"
    assert seen["screenshot"].stat().st_size > 10_000
    if os.environ.get("EDGELOADER_SCREENSHOT"):  # how docs/status-page.png is made
        shutil.copyfile(seen["screenshot"], os.environ["EDGELOADER_SCREENSHOT"])


def test_a_missing_browser_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CI must have run `make services`: there a missing Chromium is a failure, not a skip."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no .*no-chromium: run `make services`"):
        _browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _browser()
