"""Retiring a model: after a swap the old model finishes the requests it started, then lets go of its
runtime (an onnxruntime session holds the whole model in memory). A retired model that is never
released is a leak of one model per swap, which a device with a few hundred MB notices within days.

"Released" is observed as a user's memory sees it: the model's onnxruntime session no longer exists
(``live_sessions`` counts them, after a garbage collection). The engine tests keep a reference to each
model, as a logged traceback or a diagnostic would: the session must go because the engine closes
the runtime, not because the last reference to the model happened to go. A request is held in flight
with the engine's own decode budget: the test reserves all of it, so the request has taken its model
and waits for room to decode, without any part of the engine replaced.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import onnxruntime
import pytest
from packages import ssd_files, write_folder, write_zip
from waiting import eventually

from supervisor.serving.engine import Engine
from supervisor.serving.loader import LoadedModel
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository


def live_sessions() -> int:
    """onnxruntime sessions alive in this process."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, onnxruntime.InferenceSession))


def sessions_of(model: LoadedModel) -> int:
    """Sessions one model holds: two with a wide lane (a lone request's session on every core)."""
    return 2 if model.runtime.has_wide_lane else 1


async def load(engine: Engine, folder: Path, name: str) -> LoadedModel:
    return await engine.load(write_folder(folder / name, ssd_files(name, "1")))


class HeldDecodes:
    """Holds the engine's whole decode budget until ``release()``: requests wait, in flight."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._gate = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HeldDecodes:
        held = asyncio.Event()

        async def hold() -> None:
            async with self.engine.decode_budget.reserve(self.engine.decode_budget.limit):
                held.set()
                await self._gate.wait()

        self._task = asyncio.create_task(hold())
        await held.wait()
        return self

    def release(self) -> None:
        self._gate.set()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._task is not None
        await self._task


@pytest.fixture
async def two_models(engine: Engine, tmp_path: Path) -> AsyncIterator[tuple[LoadedModel, LoadedModel]]:
    first = await load(engine, tmp_path, "first")
    second = await load(engine, tmp_path, "second")
    yield first, second


async def test_a_retired_model_is_released_when_its_last_request_ends(
    engine: Engine, two_models: tuple[LoadedModel, LoadedModel], photo: bytes,
) -> None:
    first, second = two_models
    held_by_first = sessions_of(first)
    await engine.swap(first)
    sessions = live_sessions()
    async with HeldDecodes(engine) as held:
        request = asyncio.create_task(engine.detect(photo))
        await eventually(lambda: first.in_flight == 1, 5, "the request to take the first model")
        await engine.swap(second)
        assert engine.active is second
        assert live_sessions() == sessions, "the retired model was released under a request still using it"
        held.release()
        result = await request
    assert result.model.name == "first"  # finished on the model it started on
    assert result.detections, "and answered"
    assert live_sessions() == sessions - held_by_first, "the retired model was never released"
    # The new model serves; the released one is not touched again.
    assert (await engine.detect(photo)).model.name == "second"
    assert live_sessions() == sessions - held_by_first


async def test_with_several_requests_the_last_one_releases_it(
    engine: Engine, two_models: tuple[LoadedModel, LoadedModel], photo: bytes,
) -> None:
    first, second = two_models
    held_by_first = sessions_of(first)
    await engine.swap(first)
    sessions = live_sessions()
    async with HeldDecodes(engine) as held:
        requests = [asyncio.create_task(engine.detect(photo)) for _ in range(3)]
        await eventually(lambda: first.in_flight == 3, 5, "three requests on the first model")
        await engine.swap(second)
        held.release()
        # Released after the first of them ends, the others would fail (the session is gone).
        results = await asyncio.gather(*requests)
    assert [r.model.name for r in results] == ["first"] * 3
    assert live_sessions() == sessions - held_by_first


async def test_a_model_retired_with_nothing_in_flight_is_released_by_the_swap(
    engine: Engine, two_models: tuple[LoadedModel, LoadedModel], photo: bytes,
) -> None:
    first, second = two_models
    held_by_first = sessions_of(first)
    await engine.swap(first)
    assert (await engine.detect(photo)).model.name == "first"
    sessions = live_sessions()
    assert await engine.swap(second) is first
    assert live_sessions() == sessions - held_by_first
    # Swapping in the model that is already active retires nothing.
    await engine.swap(second)
    assert (await engine.detect(photo)).model.name == "second"
    assert live_sessions() == sessions - held_by_first


async def test_the_pipeline_releases_what_it_replaces_and_what_it_only_stores(
    pipeline: Pipeline, repo: Repository, engine: Engine, photo: bytes,
) -> None:
    """Through the whole update flow, nothing keeps old models: each activation releases the model it
    replaced, and a package stored without activation ("activate": false) the model its warm-up
    loaded. (Here nothing else refers to those models, so this also holds if the pipeline dropped them
    without closing them: the engine tests above are the ones that notice a missing close.)"""
    await pipeline.process(write_zip(repo.inbox_dir / "a.zip", ssd_files("tiny-ssd", "1")), source="inbox")
    sessions = live_sessions()
    for version in ("2", "3"):
        await pipeline.process(write_zip(repo.inbox_dir / f"{version}.zip", ssd_files("tiny-ssd", version)),
                               source="inbox")
        assert (await engine.detect(photo)).model.version == version
        assert live_sessions() == sessions
    await pipeline.process(write_zip(repo.inbox_dir / "4.zip", ssd_files("tiny-ssd", "4", activate=False)),
                           source="inbox")
    assert repo.get("tiny-ssd", "4") is not None and engine.active is not None
    assert engine.active.info.version == "3"
    assert live_sessions() == sessions
