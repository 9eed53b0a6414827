"""Shared fixtures. Grouped by subject; add new ones to the group they belong to (or a new group).

- Settings and the update path: ``settings``, ``engine``, ``repo``, ``events``, ``pipeline``
  (started: serving the bundled BlazeFace), all on a fresh data dir under ``tmp_path``;
  ``start_watcher`` runs a PackageWatcher on its inbox and staging.
- Waiting and writing from threads: ``wait_until``, ``write_soon``.
- Images: ``photo`` (a real JPEG with one face).
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from waiting import eventually

from supervisor.serving.engine import Engine
from supervisor.settings import Settings, load_settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository
from supervisor.updates.watcher import PackageWatcher

# -- settings and the update path ------------------------------------------------------------------


# pytest removes old temporary folders with shutil.rmtree, which recurses once per level: a tree left
# 1000 folders deep (the deep-nesting attack tests build one; a run killed half-way can leave it) would
# end the next session in RecursionError. Python 3.11 frames of pure-Python recursion cost no C stack.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Test settings: a fresh data dir, no IoT Hub, short settle time, no environment leaking in."""
    return load_settings(
        {"data_dir": tmp_path / "data", "twin": "off", "settle_seconds": 0.2, "workers": 2, "runtime_threads": 1},
        env={},
    )


@pytest.fixture
def repo(settings: Settings) -> Repository:
    repo = Repository(settings.data_dir)
    repo.ensure_layout()
    return repo


@pytest.fixture
def events() -> EventBus:
    return EventBus(history=1000)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    engine = Engine(
        workers=settings.worker_count,
        runtime_threads=settings.runtime_threads,
        max_image_pixels=settings.max_image_pixels,
        default_threshold=settings.score_threshold,
    )
    yield engine
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)


@pytest.fixture
async def pipeline(settings: Settings, repo: Repository, engine: Engine, events: EventBus) -> Pipeline:
    """A started pipeline: the repository repaired, the bundled BlazeFace serving."""
    pipeline = Pipeline(settings, repo, engine, events)
    await pipeline.start()
    return pipeline


StartWatcher = Callable[..., Awaitable[PackageWatcher]]


@pytest.fixture
async def start_watcher(settings: Settings, repo: Repository) -> AsyncIterator[StartWatcher]:
    """``await start_watcher(pipeline, **options)``: a PackageWatcher on the (existing) inbox and
    staging, running as a task until the test ends (its errors fail the test). ``options`` are
    PackageWatcher's keywords; ``settle_seconds`` defaults to the settings' one."""
    tasks: list[asyncio.Task[None]] = []

    async def start(pipeline: Any, **options: Any) -> PackageWatcher:
        options.setdefault("incomplete_timeout", 3.0)
        settle = options.pop("settle_seconds", settings.settle_seconds)
        watcher = PackageWatcher(pipeline, settings.inbox_dir, settings.staging_dir, settle, **options)
        tasks.append(asyncio.create_task(watcher.run(), name="test-watcher"))
        await asyncio.sleep(0.1)  # let the initial scan and the OS watch start
        return watcher

    yield start
    for task in tasks:
        if task.done():
            task.result()  # raise what killed it
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- waiting and writing from threads --------------------------------------------------------------


WaitUntil = Callable[..., Awaitable[Any]]


@pytest.fixture
def wait_until() -> WaitUntil:
    """``await wait_until(predicate, within=5.0, what="...")``: poll until truthy, return its value."""
    return eventually


WriteSoon = Callable[..., threading.Thread]


@pytest.fixture
def write_soon() -> Iterator[WriteSoon]:
    """``write_soon(path, data, seconds=2.0, chunks=20, delay=0.0)``: write ``data`` into ``path``
    from a thread, in ``chunks`` pieces spread over ``seconds`` (a slow USB copy), while the code
    under test runs on the loop. Threads are joined at teardown."""
    threads: list[threading.Thread] = []

    def start(path: Path, data: bytes, seconds: float = 2.0, chunks: int = 20, delay: float = 0.0) -> threading.Thread:
        def run() -> None:
            time.sleep(delay)
            step = max(1, -(-len(data) // chunks))
            with path.open("wb") as f:
                for i in range(0, len(data), step):
                    f.write(data[i : i + step])
                    f.flush()
                    time.sleep(seconds / chunks)

        thread = threading.Thread(target=run, name=f"write_soon:{path.name}", daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.join(timeout=30)


# -- images ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photo() -> bytes:
    """A real 512x512 JPEG photo with one face (scikit-image's astronaut)."""
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG", quality=90)
    return buf.getvalue()
