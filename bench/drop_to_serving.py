"""Two figures of the update path, measured on a real `edgeloader serve` process:

1. drop -> serving: from a complete package appearing in inbox/ (renamed in, as a careful copier
   does) until POST /detect answers with the new model. Median of --drops runs.
2. latency during hot swaps: four clients post a photo in a loop over loopback HTTP while the
   model is switched --swaps times through POST /models/{name}/{version}/activate; the slowest
   request and the p99, next to the same figures over an equally long stretch without swaps.

The models are real: the bundled BlazeFace short-range (serving at start) and the full-range one
from tests/data, packed with `edgeloader pack` under new versions.

    .venv/bin/python bench/drop_to_serving.py [--drops 5] [--swaps 10] [--settle 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FULL_RANGE = ROOT / "tests" / "data" / "face_detection_full_range.tflite"
BUNDLED = ("blazeface-short-range", "1")


def photo() -> bytes:
    from PIL import Image

    try:
        from skimage import data as skdata

        image = Image.fromarray(skdata.astronaut())
    except ImportError:
        image = Image.effect_noise((512, 512), 64).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pack(work: Path, version: str) -> Path:
    """A full-range BlazeFace package, version ``version``, built with `edgeloader pack`."""
    from supervisor.cli.pack import pack_main

    src = work / f"src-{version}"
    src.mkdir()
    shutil.copyfile(FULL_RANGE, src / FULL_RANGE.name)
    (src / "labels.txt").write_text("face\n")
    out = work / f"faces-full-{version}.zip"
    with contextlib.redirect_stdout(io.StringIO()):
        code = pack_main([str(src), "-o", str(out), "--name", "faces-full", "--version", version, "--no-verify"])
    assert code == 0
    return out


async def wait_ready(session: aiohttp.ClientSession, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            async with session.get("/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("the service did not become ready")


async def detect_model(session: aiohttp.ClientSession, image: bytes) -> tuple[str, str]:
    async with session.post("/detect", data=image, headers={"Content-Type": "image/jpeg"}) as resp:
        body = await resp.json()
        return body["model"]["name"], body["model"]["version"]


async def drop_to_serving(session: aiohttp.ClientSession, inbox: Path, work: Path, image: bytes,
                          runs: int) -> list[float]:
    times = []
    for i in range(1, runs + 1):
        package = pack(work, str(i))
        staged = inbox / f".{package.name}.part"  # a dot-name: the watcher ignores it
        shutil.copyfile(package, staged)
        t0 = time.perf_counter()
        os.rename(staged, inbox / package.name)
        # Polling the service is the measurement: there is nothing to await instead.
        while await detect_model(session, image) != ("faces-full", str(i)):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        times.append(time.perf_counter() - t0)
    return times


async def load(session: aiohttp.ClientSession, image: bytes, stop: asyncio.Event, latencies: list[float],
               failures: list[int]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        async with session.post("/detect", data=image, headers={"Content-Type": "image/jpeg"}) as resp:
            await resp.read()
            if resp.status != 200:
                failures.append(resp.status)
        latencies.append(time.perf_counter() - t0)


async def under_load(url: str, image: bytes, other: tuple[str, str], swaps: int, interval: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    for phase in ("baseline", "swaps"):
        stop = asyncio.Event()
        latencies: list[float] = []
        failures: list[int] = []
        sessions = [aiohttp.ClientSession(url) for _ in range(4)]
        clients = [asyncio.create_task(load(s, image, stop, latencies, failures)) for s in sessions]
        async with aiohttp.ClientSession(url) as admin:
            for i in range(swaps):
                await asyncio.sleep(interval)
                if phase == "swaps":
                    name, version = other if i % 2 == 0 else BUNDLED
                    async with admin.post(f"/models/{name}/{version}/activate") as resp:
                        assert resp.status == 200, await resp.text()
        stop.set()
        await asyncio.gather(*clients)
        for s in sessions:
            await s.close()
        latencies.sort()
        figures[f"{phase}_requests"] = len(latencies)
        figures[f"{phase}_failed"] = len(failures)
        figures[f"{phase}_p50_ms"] = 1000 * latencies[len(latencies) // 2]
        figures[f"{phase}_p99_ms"] = 1000 * latencies[int(len(latencies) * 0.99)]
        figures[f"{phase}_max_ms"] = 1000 * latencies[-1]
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drops", type=int, default=5, help="at least 1")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--swap-interval", type=float, default=0.3)
    parser.add_argument("--settle", type=float, default=None, help="settle_seconds (default: the setting's)")
    args = parser.parse_args()

    image = photo()
    with tempfile.TemporaryDirectory(prefix="edgeloader-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        port = free_port()
        env = {**os.environ, "EDGELOADER_LOG_LEVEL": "warning"}
        if args.settle is not None:
            env["EDGELOADER_SETTLE_SECONDS"] = str(args.settle)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "serve", "--data-dir", str(data), "--host", "127.0.0.1",
            "--port", str(port), "--twin", "off",
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(url) as session:
                await wait_ready(session)
                times = await drop_to_serving(session, data / "inbox", work, image, args.drops)
            other = ("faces-full", str(args.drops))
            figures = await under_load(url, image, other, args.swaps, args.swap_interval)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
    settle = args.settle if args.settle is not None else "default"
    print(f"drop -> serving (settle {settle}): median {statistics.median(times):.3f}s, "
          f"min {min(times):.3f}s, max {max(times):.3f}s over {len(times)} drops")
    print(f"4 clients, {args.swaps} swaps every {args.swap_interval}s: "
          f"{figures['swaps_requests']:.0f} requests, {figures['swaps_failed']:.0f} failed, "
          f"p50 {figures['swaps_p50_ms']:.1f} ms, p99 {figures['swaps_p99_ms']:.1f} ms, "
          f"max {figures['swaps_max_ms']:.1f} ms")
    print(f"same without swaps: {figures['baseline_requests']:.0f} requests, "
          f"p50 {figures['baseline_p50_ms']:.1f} ms, p99 {figures['baseline_p99_ms']:.1f} ms, "
          f"max {figures['baseline_max_ms']:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
