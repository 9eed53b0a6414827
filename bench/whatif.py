"""What if: the swap and memory tests against the service with a proposed change applied.

The changes recommended in docs/performance.md live in files this bench does not own, so they are
tried here by patching the service at start-up (``python bench/whatif.py serve ...`` with
``WHATIF=loader,pool``), side by side with the unpatched service, in one run:

- ``loader``: Engine.load runs in its own single thread at nice +10 instead of in the inference
  pool (supervisor/serving/engine.py), so a load never takes a worker and yields the CPU to requests.
- ``pool``: TfliteRuntime keeps ``workers`` interpreters in a queue instead of one per thread,
  created at load (handlers/runtimes.py), so no request pays for creating one after a swap.
- memory: ``MALLOC_MMAP_THRESHOLD_=4194304`` (glibc; Dockerfile ENV) and a tiny-YOLOv3 package
  whose model was optimised once by onnxruntime (``optimized_model_filepath``, what a per-device
  cache written at install time would hold), so session creation skips the layout transforms.

    .venv/bin/python bench/whatif.py [--swap] [--memory]     # figures in bench/.cache/whatif.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / ".cache" / "whatif.json"


# -- the patched service (runs in the server process) ----------------------------------------------


def _patch(which: set[str]) -> None:
    import handlers.runtimes as rt
    import supervisor.serving.engine as eng

    if "pool" in which:
        workers = int(os.environ.get("EDGELOADER_WORKERS") or 0) or min(4, os.cpu_count() or 1)

        class PooledTflite:
            def __init__(self, path: Path, threads: int = 1) -> None:
                self._content = path.read_bytes()
                cls = rt.tflite_interpreter_class()
                self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
                first = None
                for _ in range(workers):
                    it = cls(model_content=self._content, num_threads=max(1, threads))
                    it.allocate_tensors()
                    first = first or it
                    self._pool.put((it, {d["name"]: d["index"] for d in it.get_input_details()},
                                    [(d["name"], d["index"]) for d in it.get_output_details()]))
                assert first is not None
                ins, outs = first.get_input_details(), first.get_output_details()
                quant = {d["name"]: tuple(float(v) for v in d["quantization"]) for d in ins + outs}
                self.signature = rt.Signature(format="tflite", inputs=tuple(rt._tflite_spec(d) for d in ins),
                                              outputs=tuple(rt._tflite_spec(d) for d in outs),
                                              extra={"quantization": quant})

            def run(self, feeds: Any) -> dict[str, Any]:
                it, ins, outs = self._pool.get()
                try:
                    for name, value in feeds.items():
                        it.set_tensor(ins[name], value)
                    it.invoke()
                    return {name: it.get_tensor(i) for name, i in outs}
                finally:
                    self._pool.put((it, ins, outs))

            def close(self) -> None:
                while not self._pool.empty():
                    self._pool.get_nowait()

        original = rt.open_runtime

        def open_runtime(path: Path, threads: int = 1) -> Any:
            return PooledTflite(path, threads) if path.suffix.lower() == ".tflite" else original(path, threads)

        eng.open_runtime = open_runtime  # type: ignore[assignment]

    if "loader" in which:
        def lower_priority() -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)

        loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=lower_priority)

        async def load(self: Any, folder: Path, manifest: Any = None) -> Any:
            return await asyncio.get_running_loop().run_in_executor(loader, self._load_and_warm, folder, manifest)

        eng.Engine.load = load  # type: ignore[method-assign]


def serve(argv: list[str]) -> int:
    _patch(set(filter(None, os.environ.get("WHATIF", "").split(","))))
    from supervisor.__main__ import main

    return main(argv)


# -- the comparison (runs in the bench process) -----------------------------------------------------


def _server(name: str, model: Path, env: dict[str, str], patches: str) -> Any:
    from common import ROOT, Server

    class Patched(Server):
        def start(self, timeout: float = 60.0) -> Server:
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            self.data_dir.mkdir(parents=True)
            full = {**os.environ, "EDGELOADER_TWIN": "off", "EDGELOADER_LOG_FORMAT": "json",
                    "EDGELOADER_SETTLE_SECONDS": "0.2", "WHATIF": patches, **self.env}
            cmd = [sys.executable, __file__, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), "--model", str(self.model)]
            log = (self.data_dir.parent / f"{self.name}.log").open("ab")
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full)
            log.close()
            self.ready_s = self.wait_ready(timeout)
            return self

    return Patched(name, model=model, env=env)


def swap_variants(reps: int) -> list[dict[str, Any]]:
    from run import MODELS, PKGS, swaps_under_load

    rows = []
    for model in ("blazeface", "ssd-mobilenet"):
        name, prefix = MODELS[model]
        for rep in range(reps):
            variants = ["", "loader", "loader,pool"]
            for patches in variants if rep % 2 == 0 else variants[::-1]:
                with _server(f"whatif-{model}", PKGS / f"{prefix}1", {}, patches) as s:
                    s.install(PKGS / f"{prefix}2", name, "2")
                    r = asyncio.run(swaps_under_load(s, name))
                row = {"model": model, "patches": patches or "none", "failed": r["failed"],
                       "steady_p99_ms": r["steady"]["p99_ms"], "during_p99_ms": r["during_swaps"]["p99_ms"],
                       "during_p50_ms": r["during_swaps"]["p50_ms"], "p99_ratio": r["p99_ratio"],
                       "swap_ms_p50": r["swap_ms"]["p50_ms"]}
                print(f"  {model:<14} {row['patches']:<12} failed {row['failed']}  p99 steady "
                      f"{row['steady_p99_ms']:6.1f}  during {row['during_p99_ms']:6.1f} ms = {row['p99_ratio']:.2f}x  "
                      f"(swap {row['swap_ms_p50']:.0f} ms)", flush=True)
                rows.append(row)
    return rows


def _optimized_packages() -> tuple[Path, Path]:
    import onnxruntime as ort
    from common import CACHE
    from models import COCO80, package
    from run import PKGS

    model = CACHE / "whatif" / "tiny_yolov3.onnx"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(model)
        so.log_severity_level = 3
        ort.InferenceSession(str(CACHE / "tiny_yolov3.onnx"), so, providers=["CPUExecutionProvider"])
    pkgs = [package(PKGS / f"tiny-yolov3-opt-v{v}", model, COCO80, "tiny-yolov3", v, "onnx_yolov3",
                    activate=v == "1") for v in ("1", "2")]
    return pkgs[0], pkgs[1]


def memory_variants() -> list[dict[str, Any]]:
    from run import PKGS, SMALL, InProc, memory_over_swaps

    opt1, opt2 = _optimized_packages()
    plain = (PKGS / "tiny-yolov3-v1", PKGS / "tiny-yolov3-v2")
    malloc = {"MALLOC_MMAP_THRESHOLD_": "4194304"}
    rows = []
    for label, (p1, p2), env in (("as is", plain, {}), ("malloc", plain, malloc),
                                 ("optimized model", (opt1, opt2), {}), ("malloc + optimized", (opt1, opt2), malloc)):
        with _server("whatif-memory", p1, env, "") as s:
            s.install(p2, "tiny-yolov3", "2")
            inproc = InProc(p1, SMALL, env)
            try:
                size = inproc.ask(cmd="loaded_size", package=str(p2))
            finally:
                inproc.close()
            m = asyncio.run(memory_over_swaps(s, "tiny-yolov3", size["loaded_kb"], 50))
        row = {"variant": label, "env": env, "loaded_mb": round(size["loaded_kb"] / 1024, 1),
               "load_peak_mb": round(size["load_peak_kb"] / 1024, 1),
               "steady_mb": round(m["steady_peak_kb"] / 1024), "swap_peak_max_mb": round(m["swap_peak_max_kb"] / 1024),
               "peak_over_steady_vs_loaded": m["peak_over_steady_vs_loaded"],
               "rss_after_swaps_mb": [min(m["rss_after_swap_kb"]) // 1024, max(m["rss_after_swap_kb"]) // 1024],
               "growth_vs_loaded": m["growth_vs_loaded"]}
        print(f"  tiny-yolov3 {label:<20} steady {row['steady_mb']:4d} MB  swap peak {row['swap_peak_max_mb']:4d} MB "
              f"= steady + {row['peak_over_steady_vs_loaded']:.2f}x loaded ({row['loaded_mb']} MB; load alone peaks "
              f"at {row['load_peak_mb']} MB)  RSS after swaps {row['rss_after_swaps_mb']} MB", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return serve(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap", action="store_true", help="swap p99 with the loader / pool patches")
    parser.add_argument("--memory", action="store_true", help="swap peak RSS with malloc + optimized model")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    from run import ensure_setup

    ensure_setup()
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.swap or not args.memory:
        print("swaps under load (20 swaps, 2 clients):")
        results["swap"] = swap_variants(args.reps)
    if args.memory or not args.swap:
        print("memory over 50 swaps (1 client):")
        results["memory"] = memory_variants()
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"figures in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
