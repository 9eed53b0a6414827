"""The service's pipeline without HTTP, and the bare runtime, for the overhead comparison.

Run by bench/run.py as a long-lived subprocess (its own process, like the server, so neither
measures the other's garbage): ``python bench/inproc.py PACKAGE IMAGE``. It loads the package
into a ``supervisor.serving.engine.Engine`` built from the same settings as ``edgeloader serve`` (workers,
runtime threads, thresholds), then answers one JSON command per stdin line with one JSON line:

- ``{"cmd": "engine", "c": 2, "seconds": 4}``: ``c`` asyncio tasks calling ``engine.detect(jpeg)``
  in a loop: decode, preprocess, inference, postprocess, result formatting; no HTTP, no JSON.
- ``{"cmd": "bare", "c": 2, "seconds": 4, "threads": null}``: ``c`` threads calling
  ``runtime.run(feeds)`` on one already-prepared tensor (the model as loaded by the engine, or a
  separate runtime with ``threads`` intra-op threads per call).
- ``{"cmd": "cycles", "package": DIR, "n": 50}``: load, warm and close a model ``n`` times, RSS
  (heap trimmed) after each: a leak across load/unload cycles shows as a rising floor.
- ``{"cmd": "loaded_size", "package": DIR}``: RSS added by loading and warming one more model
  (on every worker thread), measured after ``malloc_trim`` so freed load-time buffers do not count.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import memory_growth, percentiles, read_status_kb, reset_peak_rss

from handlers.imaging import decode_image
from handlers.runtimes import open_runtime
from supervisor.memory import pin_mmap_threshold
from supervisor.serving.engine import Engine
from supervisor.serving.loader import LoadedModel
from supervisor.settings import load_settings

_LIBC = ctypes.CDLL("libc.so.6")


def trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS counts live memory only."""
    _LIBC.malloc_trim(0)


def rss_kb() -> int:
    return read_status_kb(os.getpid(), "VmRSS")


class Bench:
    def __init__(self, engine: Engine, model: LoadedModel, image: bytes) -> None:
        self.engine = engine
        self.model = model
        self.image = image
        decoded, _ = decode_image(image, model.handler.input_size, engine.max_image_pixels)
        self.feeds = model.handler.preprocess(decoded).feeds
        self.bare_pool = ThreadPoolExecutor(4, thread_name_prefix="bare")

    async def run_engine(self, c: int, seconds: float) -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await self.engine.detect(self.image)
                except Exception:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        return self._result(latencies, errors, time.perf_counter() - t0, time.process_time() - cpu0)

    def run_bare(self, c: int, seconds: float, threads: int | None) -> dict[str, Any]:
        runtime = self.model.runtime
        if threads is not None:
            runtime = open_runtime(self.model.info.path / self.model.info.model_file, threads)
            runtime.run(self.feeds)
        per_thread: list[list[float]] = [[] for _ in range(c)]
        start = threading.Barrier(c + 1)
        end_box: list[float] = []

        def worker(out: list[float]) -> None:
            runtime.run(self.feeds)  # per-thread state (TFLite interpreters) before the clock starts
            start.wait()
            end = end_box[0]
            while (t := time.perf_counter()) < end:
                runtime.run(self.feeds)
                out.append(time.perf_counter() - t)

        # The same threads every time: TfliteRuntime keeps one interpreter per thread that ever
        # called it, so fresh threads per measurement would pile up interpreters in this process.
        futures = [self.bare_pool.submit(worker, per_thread[i]) for i in range(c)]
        end_box.append(time.perf_counter() + seconds + 0.05)
        cpu0, t0 = time.process_time(), time.perf_counter()
        start.wait()
        for f in futures:
            f.result()
        result = self._result([x for lst in per_thread for x in lst], 0, time.perf_counter() - t0,
                              time.process_time() - cpu0)
        if threads is not None:
            runtime.close()
        return result

    @staticmethod
    def _result(latencies: list[float], errors: int, wall: float, cpu: float) -> dict[str, Any]:
        n = len(latencies)
        return {"requests": n, "errors": errors, "rps": round(n / wall, 2), **percentiles(latencies),
                "seconds": round(wall, 2), "cpu_ms_per_req": round(1000 * cpu / n, 2) if n else float("nan")}

    async def loaded_size(self, package: Path) -> dict[str, Any]:
        """RSS of one more loaded, warmed model (each worker thread has run it once)."""
        trim()
        before = rss_kb()
        reset_peak_rss(os.getpid())
        t0 = time.perf_counter()
        other = await self.engine.load(package)
        load_s = time.perf_counter() - t0
        workers = self.engine.workers
        barrier = threading.Barrier(workers)

        def on_each_thread() -> None:
            other.runtime.run(self.feeds)
            barrier.wait(10)

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.engine.executor, on_each_thread) for _ in range(workers)))
        peak = read_status_kb(os.getpid(), "VmHWM")
        trim()
        after = rss_kb()
        other.runtime.close()
        trim()
        return {"loaded_kb": after - before, "load_peak_kb": peak - before, "load_s": round(load_s, 3),
                "released_kb": after - rss_kb()}


    async def cycles(self, package: Path, n: int) -> dict[str, Any]:
        """Load, warm on every worker thread and close ``n`` times; live RSS (heap trimmed) after each."""
        loop = asyncio.get_running_loop()
        workers = self.engine.workers
        after: list[int] = []
        loaded = 0
        for i in range(n):
            trim()
            before = rss_kb()
            other = await self.engine.load(package)
            barrier = threading.Barrier(workers)

            def on_each_thread(model: LoadedModel = other, barrier: threading.Barrier = barrier) -> None:
                model.runtime.run(self.feeds)
                barrier.wait(10)

            await asyncio.gather(*(loop.run_in_executor(self.engine.executor, on_each_thread) for _ in range(workers)))
            if i == 0:
                trim()
                loaded = rss_kb() - before
            other.runtime.close()
            other = None  # type: ignore[assignment]
            gc.collect()
            trim()
            after.append(rss_kb())
        growth = memory_growth(after)
        return {"n": n, "rss_after_kb": after, "growth_kb": growth, "loaded_kb": loaded,
                "growth_vs_loaded": round(growth / loaded, 3) if loaded > 0 else None}


async def main() -> int:
    package, image = Path(sys.argv[1]), Path(sys.argv[2])
    # Results go to the original stdout; anything else printed there (logs) goes to stderr.
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    settings = load_settings({"twin": "off"})
    pin_mmap_threshold()  # as `edgeloader serve` does: the same memory behaviour as the service
    engine = Engine(workers=settings.worker_count, runtime_threads=settings.runtime_threads,
                    wide_lane=settings.wide_lane, max_image_pixels=settings.max_image_pixels,
                    default_threshold=settings.score_threshold)
    model = await engine.load(package)
    await engine.swap(model)
    bench = Bench(engine, model, image.read_bytes())
    await bench.run_engine(engine.workers, 0.5)  # warm every worker thread
    results.write(json.dumps({"ready": True, "workers": engine.workers, "runtime_threads": engine.runtime_threads,
                              "rss_kb": rss_kb()}) + "\n")
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "engine":
            out = await bench.run_engine(int(cmd["c"]), float(cmd["seconds"]))
        elif cmd["cmd"] == "bare":
            threads = cmd.get("threads")
            out = await loop.run_in_executor(None, bench.run_bare, int(cmd["c"]), float(cmd["seconds"]),
                                             int(threads) if threads is not None else None)
        elif cmd["cmd"] == "cycles":
            out = await bench.cycles(Path(cmd["package"]), int(cmd["n"]))
        elif cmd["cmd"] == "loaded_size":
            out = await bench.loaded_size(Path(cmd["package"]))
        elif cmd["cmd"] == "quit":
            break
        else:
            out = {"error": f"unknown command {cmd['cmd']!r}"}
        results.write(json.dumps(out) + "\n")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
