"""The thread plan: a lone request gets every core (the wide lane); several at once share the
narrow lanes (one thread each), so neither one camera nor many clients pay for the other.

Run against the real runtimes: LiteRT with the bundled BlazeFace, onnxruntime with a tiny-YOLOv3.
What a user would notice if this broke: a lone request on one core (twice the latency), or several
clients oversubscribing the cores, or the two lanes answering differently."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from modelgen import tiny_yolov3_onnx
from packages import BUNDLED, SSD_LABELS

from supervisor.serving.engine import Engine


@pytest.fixture
async def four_core_engine(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Engine]:
    # The plan depends on the core count: pin it, so the test means the same on any CI machine.
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    engine = Engine(workers=2, runtime_threads=0)
    yield engine
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)


def _record_lanes(engine: Engine) -> list[bool]:
    """Which lane each inference call takes (True: the wide one), recorded around the real call."""
    model = engine.active
    assert model is not None
    seen: list[bool] = []
    real = model.runtime.run

    def run(feeds: Mapping[str, np.ndarray], alone: bool = False) -> dict[str, np.ndarray]:
        seen.append(alone)
        return real(feeds, alone=alone)

    model.runtime.run = run  # type: ignore[method-assign]
    return seen


async def test_the_plan_follows_the_cores(four_core_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (four_core_engine.runtime_threads, four_core_engine.wide_threads) == (2, 4)
    assert Engine(workers=2, runtime_threads=0, wide_lane=False).wide_threads == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert Engine(workers=1).wide_threads == 0  # nothing wider than one core to give


@pytest.mark.parametrize("family", ["tflite", "onnx"])
async def test_a_lone_request_takes_the_wide_lane_and_concurrent_ones_do_not(
    four_core_engine: Engine, photo: bytes, tmp_path: Path, family: str
) -> None:
    engine = four_core_engine
    if family == "tflite":
        folder = BUNDLED
    else:
        folder = tmp_path / "yolo"
        folder.mkdir()
        tiny_yolov3_onnx(folder / "model.onnx")
        (folder / "labels.txt").write_text(SSD_LABELS + "".join(f"c{i}\n" for i in range(80)))
    await engine.swap(await engine.load(folder))
    assert engine.active is not None and engine.active.runtime.has_wide_lane
    lanes = _record_lanes(engine)

    alone = await engine.detect(photo, threshold=0.0)
    assert lanes == [True]

    lanes.clear()
    together = await asyncio.gather(*(engine.detect(photo, threshold=0.0) for _ in range(4)))
    assert len(lanes) == 4
    assert lanes.count(False) >= 3  # at most the first, before the others arrived, may run wide

    # Both lanes are the same model: the same answer, whichever a request took.
    for result in together:
        assert len(result.detections) == len(alone.detections)
        for got, want in zip(result.detections, alone.detections, strict=True):
            assert got["label"] == want["label"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
            for side in ("xmin", "ymin", "xmax", "ymax"):
                assert got["box"][side] == pytest.approx(want["box"][side], abs=0.5)


async def test_without_the_wide_lane_every_call_shares_the_cores(photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    engine = Engine(workers=2, runtime_threads=0, wide_lane=False)
    try:
        await engine.swap(await engine.load(BUNDLED))
        model = engine.active
        assert model is not None
        assert not model.runtime.has_wide_lane  # no interpreter made for it: its memory is saved
        result = await engine.detect(photo)
        assert [d["label"] for d in result.detections] == ["face"]
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
