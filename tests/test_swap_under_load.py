"""Hot swap under load: four clients post photos over real HTTP on loopback while the model is
switched ten times between a TFLite and an ONNX model. No request fails, and every answer names
a model that was active at some moment while that request was in flight."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from packages import ssd_files, write_zip

from supervisor.app import build_app
from supervisor.http.keys import EVENTS, PIPELINE
from supervisor.settings import Settings

A = ("blazeface-short-range", "1")  # the bundled model, TFLite
B = ("tiny-ssd", "1")  # ONNX


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    model: tuple[str, str] | None


async def test_ten_swaps_under_load_lose_no_request(aiohttp_server, settings: Settings, photo: bytes) -> None:
    server = await aiohttp_server(build_app(settings, services=False))
    app = server.app
    pipeline, events = app[PIPELINE], app[EVENTS]
    await pipeline.process(write_zip(settings.inbox_dir / "b.zip", ssd_files(*B)), source="inbox")
    await pipeline.activate(*A)
    url = str(server.make_url("/"))
    stop = asyncio.Event()
    answers: list[Answer] = []

    async def client() -> None:
        async with aiohttp.ClientSession(url) as session:
            while not stop.is_set():
                sent = time.time()
                async with session.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"}) as resp:
                    body = await resp.json()
                model = body.get("model")
                answers.append(Answer(sent, time.time(), resp.status,
                                      (model["name"], model["version"]) if model else None))

    clients = [asyncio.create_task(client()) for _ in range(4)]
    swaps_from = len(events.history)
    try:
        async with aiohttp.ClientSession(url) as admin:
            await asyncio.sleep(0.2)
            for i in range(10):
                target = B if i % 2 == 0 else A
                async with admin.post(f"/models/{target[0]}/{target[1]}/activate") as resp:
                    assert resp.status == 200, await resp.text()
                await asyncio.sleep(0.25)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    assert len(answers) > 40
    # The swap timeline: (instant, model) from the "active" events, published at the swap itself.
    timeline = [(time.time() - 3600, A)] + [
        (e.at, (e.name or "", e.version or "")) for e in list(events.history)[swaps_from:] if e.state == "active"
    ]
    assert len(timeline) == 11 and [m for _, m in timeline] == [A, B] * 5 + [A]

    def active_during(a: Answer) -> set[tuple[str, str]]:
        ends = [t for t, _ in timeline[1:]] + [float("inf")]
        return {m for (start, m), end in zip(timeline, ends, strict=True) if start <= a.received and end >= a.sent}

    inconsistent = [a for a in answers if a.model not in active_during(a)]
    assert not inconsistent, f"answers naming a model not active while they were served: {inconsistent[:3]}"
    assert {a.model for a in answers} == {A, B}, "both models served"
    latency = max(a.received - a.sent for a in answers)
    assert latency < 2.0, f"a request took {latency:.2f}s during the swaps"
