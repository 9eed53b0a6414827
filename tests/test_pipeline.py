"""The update pipeline end to end on disk: install, activate, store, duplicates, intents, rollback
(through the API and automatic), retention, and resuming an interrupted update."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from aiohttp.test_utils import TestClient
from packages import last, ssd_files, states, write_folder, write_zip
from structlog.testing import capture_logs

from supervisor.app import build_app
from supervisor.http.keys import EVENTS, PIPELINE
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository

if TYPE_CHECKING:
    from conftest import WaitUntil


def active_key(engine: Engine) -> tuple[str, str] | None:
    model = engine.active
    return (model.info.name, model.info.version) if model else None


async def test_a_zip_package_is_validated_installed_and_activated(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus, photo: bytes
) -> None:
    package = write_zip(repo.inbox_dir / "tiny.zip", ssd_files("tiny-ssd", "7"))
    version = await pipeline.process(package, source="inbox")
    assert version is not None and version.key == ("tiny-ssd", "7")
    assert states(events, "tiny.zip") == ["received", "validating", "activating", "active"]
    active = last(events, "active")
    assert active is not None and active.sha256 and active.model_sha256
    assert active.model_path == "models/tiny-ssd/7/model.onnx"
    assert active_key(engine) == ("tiny-ssd", "7")
    current = repo.current()
    assert current is not None and current.key == ("tiny-ssd", "7")
    assert current.record["handler"] == "onnx_ssd" and current.record["source"] == "inbox"
    assert not package.exists(), "a processed package is removed from the drop folder"
    assert list(repo.staging_dir.iterdir()) == []
    result = await engine.detect(photo)
    assert result.model.name == "tiny-ssd"
    assert [d["label"] for d in result.detections] == ["thing"]
    # The bundled model it replaced is the rollback target.
    previous = repo.previous()
    assert previous is not None and previous.name == "blazeface-short-range"


async def test_a_zip_made_on_a_mac_installs(pipeline: Pipeline, engine: Engine, repo: Repository) -> None:
    """Finder's zips carry .DS_Store and __MACOSX/ litter: hidden files are no package content (not
    hashed, not looked at for the model), and the files after them in the zip are all taken."""
    import zipfile

    files = ssd_files("mac", "1")
    path = repo.inbox_dir / "mac.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(".DS_Store", b"\0\0\0\1Bud1" + bytes(100))
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/._model.onnx", b"\0\5\26\7" + bytes(50))
    version = await pipeline.process(path, source="inbox")
    assert version is not None and active_key(engine) == ("mac", "1")
    assert set(version.record["file_sha256"]) == {"model.json", "model.onnx", "labels.txt"}


async def test_folder_packages_and_name_from_the_file(pipeline: Pipeline, engine: Engine, repo: Repository) -> None:
    files = ssd_files("ignored", "1")
    meta = json.loads(files["model.json"])
    del meta["name"], meta["version"]
    files["model.json"] = json.dumps(meta).encode()
    folder = write_folder(repo.inbox_dir / "parking-lot", files)
    version = await pipeline.process(folder, source="inbox")
    assert version is not None and version.name == "parking-lot"
    assert len(version.version) == 12, "no version given: the package hash names it"
    assert active_key(engine) == version.key
    assert not folder.exists()
    # After a restart, and after switching away and back, it still answers under the name and
    # version the repository gave it (not its file name and "1": model.json does not say).
    restarted = Pipeline(pipeline.settings, repo, engine, EventBus())
    await restarted.start()
    assert active_key(engine) == version.key
    await restarted.activate("blazeface-short-range", "1")
    await restarted.activate(*version.key)
    assert active_key(engine) == version.key


async def test_activate_false_stores_without_activating(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    before = active_key(engine)
    package = write_zip(repo.inbox_dir / "later.zip", ssd_files("tiny-ssd", "2", activate=False))
    version = await pipeline.process(package, source="inbox")
    assert version is not None and repo.get("tiny-ssd", "2") is not None
    assert states(events, "later.zip")[-1] == "stored"
    assert active_key(engine) == before
    await pipeline.activate("tiny-ssd", "2")
    assert active_key(engine) == ("tiny-ssd", "2")


async def test_an_intent_beside_the_package_overrides_the_manifest(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    package = write_zip(repo.staging_dir / "from-twin.zip", ssd_files("tiny-ssd", "3"))
    intent = {"source": "twin", "activate": False, "name": "from-hub"}
    (repo.staging_dir / "from-twin.zip.intent.json").write_text(json.dumps(intent))
    await pipeline.process(package, source="staging")
    stored = last(events, "stored")
    assert stored is not None and stored.source == "twin"
    # model.json names the model; the intent's name is only a fallback for packages without one.
    assert repo.get("tiny-ssd", "3") is not None
    assert active_key(engine) == ("blazeface-short-range", "1")
    assert not list(repo.staging_dir.iterdir()), "package and sidecar are both consumed"


async def test_the_same_package_dropped_again_is_active_again(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    """Dropping an installed package again does what dropping it did the first time (and what --model
    with the same file does): its manifest says activate, so its version becomes active again."""
    files = ssd_files("tiny-ssd", "4")
    await pipeline.process(write_zip(repo.inbox_dir / "a.zip", files), source="inbox")
    await pipeline.activate("blazeface-short-range", "1")  # the operator went back by hand
    again = write_zip(repo.inbox_dir / "a-copy.zip", files)
    version = await pipeline.process(again, source="inbox")
    assert version is not None and version.key == ("tiny-ssd", "4")
    assert active_key(engine) == ("tiny-ssd", "4")
    assert states(events, "a-copy.zip") == ["received", "activating", "active"]
    assert not again.exists()
    # Already active: a third copy is only a duplicate.
    await pipeline.process(write_zip(repo.inbox_dir / "a-3.zip", files), source="inbox")
    dup = last(events, "duplicate")
    assert dup is not None and dup.package == "a-3.zip" and dup.reason == "already installed"


async def test_a_package_that_asks_not_to_activate_stays_a_duplicate(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    files = ssd_files("tiny-ssd", "5", activate=False)
    await pipeline.process(write_zip(repo.inbox_dir / "a.zip", files), source="inbox")
    await pipeline.process(write_zip(repo.inbox_dir / "b.zip", files), source="inbox")
    assert active_key(engine) == ("blazeface-short-range", "1")
    assert states(events, "b.zip") == ["received", "duplicate"]


async def test_a_rejected_package_dropped_again_is_recognised(
    pipeline: Pipeline, repo: Repository, events: EventBus
) -> None:
    bad = ssd_files("tiny-ssd", "5")
    del bad["labels.txt"]
    with capture_logs() as logs:
        await pipeline.process(write_zip(repo.inbox_dir / "bad.zip", bad), source="inbox")
    assert states(events, "bad.zip")[-1] == "rejected"
    [logged] = [e for e in logs if e["event"] == "package_quarantined"]
    assert logged["log_level"] == "warning" and "labels.txt" in logged["reason"]
    assert any(e["event"] == "model_event" and e["state"] == "rejected" for e in logs)
    assert len(pipeline.quarantine.entries()) == 1
    await pipeline.process(write_zip(repo.inbox_dir / "bad-again.zip", bad), source="inbox")
    dup = last(events, "duplicate")
    assert dup is not None and dup.package == "bad-again.zip" and "already rejected" in (dup.reason or "")
    assert len(pipeline.quarantine.entries()) == 1, "not quarantined (nor processed) twice"
    assert not (repo.inbox_dir / "bad-again.zip").exists()


async def test_same_version_with_other_content_is_rejected(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    await pipeline.process(write_zip(repo.inbox_dir / "v1.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    other = ssd_files("tiny-ssd", "1", score_threshold=0.3)
    assert await pipeline.process(write_zip(repo.inbox_dir / "v1b.zip", other), source="inbox") is None
    rejected = last(events, "rejected")
    assert rejected is not None and "already installed" in (rejected.reason or "")
    assert active_key(engine) == ("tiny-ssd", "1")
    assert list(repo.staging_dir.iterdir()) == [], "the unpacked copy is cleaned up"


async def test_retention_keeps_three_and_the_rollback_target(
    pipeline: Pipeline, repo: Repository, settings: Settings
) -> None:
    assert settings.keep_versions == 3
    for i in range(1, 6):
        await pipeline.process(write_zip(repo.inbox_dir / f"{i}.zip", ssd_files("tiny-ssd", str(i))), source="inbox")
    versions = sorted(v.version for v in repo.versions() if v.name == "tiny-ssd")
    assert versions == ["3", "4", "5"]
    previous = repo.previous()
    assert previous is not None and previous.key == ("tiny-ssd", "4")
    assert repo.get("blazeface-short-range", "1") is not None, "another name: its own retention"


async def test_an_interrupted_update_is_finished_when_its_package_comes_back(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus
) -> None:
    """A crash after the install and before the flip leaves the version installed (never
    activated) and the package in the drop folder: processing it again activates it."""
    files = ssd_files("tiny-ssd", "8")
    package = write_zip(repo.inbox_dir / "p.zip", files)
    copy = package.read_bytes()
    await pipeline.process(package, source="inbox")
    # Rewind to "installed, not activated": the marker written after the flip, and the flip.
    installed = repo.get("tiny-ssd", "8")
    assert installed is not None
    (installed.path / ".activated").unlink()
    await pipeline.activate("blazeface-short-range", "1")
    package.write_bytes(copy)
    await pipeline.process(package, source="inbox")
    assert active_key(engine) == ("tiny-ssd", "8")
    assert states(events, "p.zip")[-2:] == ["activating", "active"]


async def test_rollback_and_roll_forward_through_the_api(aiohttp_client, settings: Settings) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline = client.app[PIPELINE]
    inbox = settings.inbox_dir
    for v in ("1", "2"):
        await pipeline.process(write_zip(inbox / f"{v}.zip", ssd_files("tiny-ssd", v)), source="inbox")

    async def models() -> dict:
        resp = await client.get("/models")
        assert resp.status == 200
        return await resp.json()

    body = await models()
    by_version = {(v["name"], v["version"]): v["state"] for v in body["versions"]}
    assert by_version == {("tiny-ssd", "2"): "active", ("tiny-ssd", "1"): "previous",
                          ("blazeface-short-range", "1"): "stored"}

    resp = await client.post("/models/tiny-ssd/1/activate")
    assert resp.status == 200 and (await resp.json())["active"] == {"name": "tiny-ssd", "version": "1"}
    body = await models()
    assert body["active"]["version"] == "1" and body["current_on_disk"] == "tiny-ssd/1"
    states_now = {v["version"]: v["state"] for v in body["versions"] if v["name"] == "tiny-ssd"}
    assert states_now == {"1": "active", "2": "previous"}
    assert [e["state"] for e in body["events"]][-2:] == ["activating", "active"]

    resp = await client.post("/models/tiny-ssd/2/activate")  # roll forward again
    assert resp.status == 200
    resp = await client.post("/models/tiny-ssd/9/activate")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    assert client.app[EVENTS].history[-1].state == "active"


async def test_each_rollback_goes_one_version_further_back(aiohttp_client, settings: Settings) -> None:
    """Not a toggle between the last two: v3 -> v2 -> v1 -> the bundled model -> 409, across a restart."""
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    for v in ("1", "2", "3"):
        await client.app[PIPELINE].process(write_zip(settings.inbox_dir / f"{v}.zip", ssd_files("tiny-ssd", v)),
                                           source="inbox")

    async def rollback(c: TestClient) -> tuple[int, dict]:
        resp = await c.post("/models/rollback")
        return resp.status, await resp.json()

    assert await rollback(client) == (200, {"active": {"name": "tiny-ssd", "version": "2"}})
    assert await rollback(client) == (200, {"active": {"name": "tiny-ssd", "version": "1"}})
    await client.close()
    # A restart keeps the order: the next rollback goes on from tiny-ssd 1.
    again: TestClient = await aiohttp_client(build_app(settings, services=False))
    assert (await (await again.get("/models")).json())["active"]["version"] == "1"
    assert await rollback(again) == (200, {"active": {"name": "blazeface-short-range", "version": "1"}})
    status, body = await rollback(again)
    assert status == 409 and body["error"]["code"] == "conflict"
    assert body["error"]["message"] == ("nothing older to roll back to: blazeface-short-range 1 is the oldest "
                                        "version still installed that was active here")
    # Going forward by hand, then back: the rollback returns to what was serving before.
    assert (await again.post("/models/tiny-ssd/3/activate")).status == 200
    assert await rollback(again) == (200, {"active": {"name": "blazeface-short-range", "version": "1"}})


async def test_automatic_rollback_when_real_requests_fail(
    aiohttp_client, settings: Settings, photo: bytes, wait_until: WaitUntil
) -> None:
    """A model that passes warm-up (blank image) but fails on every real image is rolled back
    after `rollback_after_failures` failed requests; the previous model answers again."""
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline, events = client.app[PIPELINE], client.app[EVENTS]
    inbox = settings.inbox_dir
    await pipeline.process(write_zip(inbox / "good.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    bad = ssd_files("tiny-ssd", "2", fail_on_real_images=True)
    version = await pipeline.process(write_zip(inbox / "bad.zip", bad), source="inbox")
    assert version is not None, "the broken model passes every check before activation"
    assert states(events, "bad.zip")[-1] == "active"

    statuses = []
    for _ in range(settings.rollback_after_failures):
        resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
        statuses.append(resp.status)
        body = await resp.json()
        assert "inference failed" in body["error"]["message"]
    assert statuses == [500] * settings.rollback_after_failures

    # The rollback runs as its own task: give it a moment.
    rolled = await wait_until(lambda: last(events, "rolled_back"), within=5, what="the automatic rollback")
    assert rolled.source == "auto-rollback"
    assert (rolled.name, rolled.version) == ("tiny-ssd", "1")
    resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200
    assert (await resp.json())["model"] == {"name": "tiny-ssd", "version": "1"}
    models = await (await client.get("/models")).json()
    states_now = {v["version"]: v["state"] for v in models["versions"] if v["name"] == "tiny-ssd"}
    assert states_now == {"1": "active", "2": "previous"}


async def test_no_rollback_once_the_new_model_has_served(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus, photo: bytes
) -> None:
    """Failures after a success are the images' fault, not a bad activation: no rollback."""
    await pipeline.process(write_zip(repo.inbox_dir / "good.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    await engine.detect(photo)
    for _ in range(5):
        try:
            await engine.detect(b"\xff\xd8\xff" + b"\0" * 100)  # a broken JPEG: a client error
        except Exception:
            pass
    assert last(events, "rolled_back") is None
    assert active_key(engine) == ("tiny-ssd", "1")


async def test_activating_the_active_version_again_is_a_no_op(aiohttp_client, settings: Settings) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    resp = await client.post("/models/blazeface-short-range/1/activate")
    assert resp.status == 200
    assert await resp.json() == {"active": {"name": "blazeface-short-range", "version": "1"}}
    assert "activating" not in states(client.app[EVENTS])


async def test_shutdown_stops_an_automatic_rollback_under_way(
    pipeline: Pipeline, engine: Engine, repo: Repository, events: EventBus, photo: bytes, settings: Settings,
) -> None:
    """The service stops just as the failing requests have asked for a rollback: the rollback is
    stopped and waited for, not left running behind the engine's shutdown (or half-done)."""
    await pipeline.process(write_zip(repo.inbox_dir / "good.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    bad = ssd_files("tiny-ssd", "2", fail_on_real_images=True)
    await pipeline.process(write_zip(repo.inbox_dir / "bad.zip", bad), source="inbox")
    for _ in range(settings.rollback_after_failures):
        try:
            await engine.detect(photo)
        except Exception:
            pass
    assert last(events, "failed") is not None  # the rollback was asked for...
    await pipeline.close()  # ...and the service stops at once
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "auto-rollback"], "the rollback outlived close()"
    assert last(events, "rolled_back") is None and active_key(engine) == ("tiny-ssd", "2")

