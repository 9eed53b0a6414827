"""Warm-up: a model runs one blank image through the whole path (preprocess, runtime, postprocess)
before it may serve. A model that loads but fails there never becomes active, whatever brought it:
a dropped package, an API activation of a stored version, the start-up, ``edgeloader verify``.

The model (``ssd_onnx(fail_at_warmup=True)``, tests/packages.py) is a real ONNX graph with the SSD
signature: onnxruntime loads it and the onnx_ssd handler takes it; only running it fails.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from packages import last, ssd_files, states, write_folder, write_zip

from supervisor.app import build_app
from supervisor.cli.pack import verify_main
from supervisor.formats import INSTALL_RECORD
from supervisor.http.keys import ENGINE, PIPELINE
from supervisor.serving.engine import Engine
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository

BUNDLED = ("blazeface-short-range", "1")


def active_key(engine: Engine) -> tuple[str, str] | None:
    model = engine.active
    return (model.info.name, model.info.version) if model else None


def hand_installed(repo: Repository, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A version folder as an earlier release of the service left it (its warm-up passed then; a
    runtime upgrade since makes it fail): the files and an install record, no model cache."""
    folder = write_folder(repo.models_dir / name / version, files)
    record = {"name": name, "version": version, "installed_at": time.time(), "package": f"{name}-{version}.zip",
              "package_sha256": "0" * 64, "source": "inbox", "model_file": "model.onnx", "labels_file": "labels.txt"}
    (folder / INSTALL_RECORD).write_text(json.dumps(record))
    return folder


async def test_a_dropped_model_that_fails_its_warm_up_is_quarantined_and_never_serves(
    pipeline: Pipeline, repo: Repository, engine: Engine, events: EventBus, photo: bytes,
) -> None:
    package = write_zip(repo.inbox_dir / "bad.zip", ssd_files("tiny-ssd", "2", fail_at_warmup=True))
    assert await pipeline.process(package, source="inbox") is None
    rejected = last(events, "rejected")
    assert rejected is not None and rejected.package == "bad.zip"
    assert (rejected.reason or "").startswith("warm-up inference failed: Gather node: indices element out of data")
    assert "activating" not in states(events, "bad.zip") and "active" not in states(events, "bad.zip")
    assert active_key(engine) == BUNDLED
    assert repo.current() is not None and repo.current().key == BUNDLED  # type: ignore[union-attr]
    assert repo.get("tiny-ssd", "2") is None and not (repo.models_dir / "tiny-ssd").exists()
    assert [e["package"] for e in pipeline.quarantine.entries()] == ["bad.zip"]
    assert (await engine.detect(photo)).model.name == BUNDLED[0]  # still answering, on the old model


async def test_activating_a_stored_version_that_fails_its_warm_up_keeps_the_old_one(
    aiohttp_client, settings: Settings,
) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline, engine = client.app[PIPELINE], client.app[ENGINE]
    await pipeline.process(write_zip(settings.inbox_dir / "good.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    assert active_key(engine) == ("tiny-ssd", "1")
    hand_installed(pipeline.repo, "tiny-ssd", "2", ssd_files("tiny-ssd", "2", fail_at_warmup=True))

    resp = await client.post("/models/tiny-ssd/2/activate")
    body = await resp.json()
    assert resp.status == 500 and body["error"]["code"] == "model_error", body
    assert "warm-up inference failed" in body["error"]["message"]
    assert active_key(engine) == ("tiny-ssd", "1")
    assert pipeline.repo.current().key == ("tiny-ssd", "1")  # the link was never flipped
    models = await (await client.get("/models")).json()
    assert models["active"]["version"] == "1"


async def test_a_current_version_that_fails_its_warm_up_is_not_served_at_start(
    settings: Settings, repo: Repository, engine: Engine, events: EventBus,
) -> None:
    """After an upgrade the version ``current`` names fails its warm-up: start-up serves the newest
    version that passes instead (here the bundled default), never the broken one."""
    bad = hand_installed(repo, "tiny-ssd", "2", ssd_files("tiny-ssd", "2", fail_at_warmup=True))
    os.symlink(os.path.join("models", "tiny-ssd", "2"), repo.current_link)
    await Pipeline(settings, repo, engine, events).start()
    assert active_key(engine) == BUNDLED
    assert bad.is_dir()  # kept: an operator may want to look at it, or roll back to it once fixed


def test_verify_refuses_a_model_that_fails_its_warm_up(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    package = write_zip(tmp_path / "bad.zip", ssd_files("tiny-ssd", "2", fail_at_warmup=True))
    assert verify_main([str(package)]) != 0
    assert "warm-up inference failed" in capsys.readouterr().err


async def test_a_default_model_that_fails_its_warm_up_leaves_nothing_behind(
    settings: Settings, repo: Repository, engine: Engine, events: EventBus, tmp_path: Path,
) -> None:
    """The bundled default (settings.bundled_model, here one that fails its warm-up) is the last model
    start-up can serve: it refuses to start with the reason, and its half-built version is not left in
    staging/ nor installed."""
    from supervisor.errors import ModelInvalid

    bundled = write_folder(tmp_path / "bundled", ssd_files("default", "1", fail_at_warmup=True))
    pipeline = Pipeline(settings.replace(bundled_model=bundled), repo, engine, events)
    with pytest.raises(ModelInvalid, match="warm-up inference failed"):
        await pipeline.start()
    assert engine.active is None and repo.versions() == []
    assert list(repo.staging_dir.iterdir()) == []
