"""A corpus of bad packages dropped into the inbox while the service answers requests: each one is
quarantined with a reason naming its problem, none is retried, and the active model never stops
answering."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from aiohttp.test_utils import TestClient
from packages import BAD_PACKAGES, bad_package, ssd_files, write_zip

from supervisor.app import build_app
from supervisor.http.keys import EVENTS, PIPELINE
from supervisor.settings import Settings
from supervisor.updates.quarantine import REASON_FILE

if TYPE_CHECKING:
    from conftest import StartWatcher, WaitUntil


async def test_every_bad_package_is_quarantined_with_its_reason(
    aiohttp_client, settings: Settings, photo: bytes, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline, events = client.app[PIPELINE], client.app[EVENTS]
    await pipeline.process(write_zip(settings.inbox_dir / "good.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    # A truncated zip is first taken for a copy in progress: give up on it quickly here.
    await start_watcher(pipeline, incomplete_timeout=1.0)

    answered: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def keep_asking() -> None:
        while not stop.is_set():
            resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
            body = await resp.json()
            answered.append((resp.status, body.get("model", {}).get("version", body)))

    asker = asyncio.create_task(keep_asking())
    expected = {}
    for kind in BAD_PACKAGES:
        path, words = bad_package(kind, settings.inbox_dir)
        expected[path.name] = (kind, words)

    def rejected() -> dict[str, str]:
        return {e.package: e.reason or "" for e in events.history if e.state == "rejected"}

    try:
        await wait_until(lambda: len(rejected()) == len(expected), within=20,
                         what=f"{len(expected)} rejections (have {sorted(rejected())})")
    finally:
        stop.set()
        await asker

    wrong = [
        f"{kind}: reason {rejected()[name]!r} does not name {words}"
        for name, (kind, words) in expected.items()
        if not all(w in rejected()[name] for w in words)
    ]
    assert not wrong, "\n".join(wrong)
    # Each entry keeps the package (and its sidecars) with the reason, for the operator.
    entries = {e["package"]: e for e in pipeline.quarantine.entries()}
    assert set(entries) == set(expected)
    quarantine = settings.quarantine_dir
    sidecar = next(quarantine.glob("*-sidecar.zip"))
    assert sorted(p.name for p in sidecar.iterdir()) == [REASON_FILE, "sidecar.zip", "sidecar.zip.sha256"]
    assert json.loads((sidecar / REASON_FILE).read_text())["sha256"]
    # The inbox is empty again, nothing was left in staging, the good model kept answering.
    assert sorted(p.name for p in settings.inbox_dir.iterdir()) == []
    assert [p.name for p in settings.staging_dir.iterdir()] == []
    assert len(answered) > 10 and all(a == (200, "1") for a in answered), answered[:5]
    assert [e.state for e in events.history].count("active") == 2  # start-up and good.zip only


async def test_the_same_bad_package_again_is_not_reprocessed(
    pipeline, settings: Settings, events, start_watcher: StartWatcher, wait_until: WaitUntil,
) -> None:
    await start_watcher(pipeline)
    bad_package("garbage-model", settings.inbox_dir)
    await wait_until(lambda: any(e.state == "rejected" for e in events.history), what="the rejection")
    bad_package("garbage-model", settings.inbox_dir)  # the operator drops it again
    dup = await wait_until(lambda: next((e for e in events.history if e.state == "duplicate"), None),
                           what="the duplicate")
    assert "already rejected" in (dup.reason or "")
    assert [e.state for e in events.history].count("validating") == 1
    assert len(pipeline.quarantine.entries()) == 1
