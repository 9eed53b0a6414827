"""`make bench`: the service against the runtime's own limit, as ratios taken in one run.

Sections (each measured side by side on this machine, interleaved, bounded in time):

1. overhead   /detect over HTTP (wrk, loopback) vs the same pipeline in-process (engine.detect) vs
              the bare runtime call on a prepared tensor; concurrency 1, 2, 4; three models.
2. swaps      20 activations between two installed versions while 2 clients post images:
              failed requests, p99 of requests overlapping a swap (or starting within 100 ms
              after it) vs steady p99.
3. big image  end-to-end latency of a 12 MP JPEG vs a 640x480 one (416x416 model).
4. memory     steady RSS per model; peak RSS during a swap vs the new model's loaded size;
              RSS across 50 swaps (leaks over load/unload cycles).
5. startup    process start to /readyz 200 with the bundled default model.
6. bandwidth  bytes a device fetches for each kind of model update (bench/bandwidth.py): identical
              re-pack, labels, threshold, head, half and full retrain, nothing reusable; ONNX and
              TFLite; with the device's CPU time and peak memory for assembling the package.

Prints tables and writes bench/results.json. Runs bench/setup.sh first when the models, wrk or
torch are missing. ``--seconds`` sets the length of one measurement (default 4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    CACHE,
    ROOT,
    InProc,
    Server,
    memory_growth,
    merge_rounds,
    percentiles,
    read_status_kb,
    reset_peak_rss,
    wrk,
)
from loadgen import Load, Sample

RESULTS = BENCH / "results.json"
PKGS = CACHE / "packages"
SMALL = CACHE / "photo_640x480.jpg"
LARGE = CACHE / "photo_12mp.jpg"

# model key -> (package name in the repository, package folder prefix)
MODELS = {
    "tiny-yolov3": ("tiny-yolov3", "tiny-yolov3-v"),
    "ssd-mobilenet": ("ssd-mobilenet", "ssd-mobilenet-v"),
    "blazeface": ("blazeface-bench", "blazeface-v"),
}
MODEL_DESC = {
    "tiny-yolov3": "tiny-YOLOv3 416, ONNX (onnxruntime), 8.85 M params, onnx_yolov3",
    "ssd-mobilenet": "SSD MobileNetV2 300, TFLite (LiteRT), 6.0 M params, tflite_ssd",
    "blazeface": "BlazeFace short-range 128, TFLite (LiteRT), bundled, blazeface",
}
CONCURRENCY = (1, 2, 4)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- set-up ---------------------------------------------------------------------------------------


def ensure_setup() -> None:
    needed = [CACHE / "stamp.json", SMALL, LARGE, PKGS / "tiny-yolov3-v2" / "model.json",
              PKGS / "ssd-mobilenet-v2" / "model.json"]
    if all(p.exists() for p in needed) and shutil.which("wrk"):
        return
    log("cache or wrk missing: running bench/setup.sh")
    subprocess.run(["bash", str(BENCH / "setup.sh")], check=True, cwd=ROOT)


# -- the in-process side ----------------------------------------------------------------------------


# -- 1. overhead ------------------------------------------------------------------------------------


def overhead(model: str, server: Server, inproc: InProc, seconds: float, rounds: int) -> dict[str, Any]:
    """Every (concurrency, mode) once per round, the order reversed every other round, so that a
    neighbour's load spreads over all configurations instead of landing on one."""
    wrk(server.url + "/detect", SMALL, 2, 1.0)  # warm the server's workers and connections
    cpus = os.cpu_count() or 1
    configs = [(c, mode) for c in CONCURRENCY for mode in ("http", "inproc", "bare")] + [(1, "bare_all_threads")]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {cfg: [] for cfg in configs}
    for r in range(rounds):
        for c, mode in configs if r % 2 == 0 else configs[::-1]:
            if mode == "http":
                res = wrk(server.url + "/detect", SMALL, c, seconds, server.pid)
            elif mode == "inproc":
                res = inproc.ask(cmd="engine", c=c, seconds=seconds)
            elif mode == "bare":
                res = inproc.ask(cmd="bare", c=c, seconds=seconds)
            else:  # one call using every core: what the runtime does for a single client
                res = inproc.ask(cmd="bare", c=1, seconds=seconds, threads=cpus)
            runs[(c, mode)].append(res)
    table: dict[str, Any] = {}
    for (c, mode), lst in runs.items():
        table.setdefault(str(c), {})[mode] = merge_rounds(lst)
    for c in CONCURRENCY:
        row = table[str(c)]
        log(f"{model} c={c}: http {row['http']['rps']:.1f}/s  in-process {row['inproc']['rps']:.1f}/s  "
            f"bare {row['bare']['rps']:.1f}/s  (wrk used {row['http'].get('loadgen_cpu_pct', 0):.0f}% of a core)")
    best = {mode: max(table[str(c)][mode]["rps"] for c in CONCURRENCY) for mode in ("http", "inproc", "bare")}
    best["bare_all_threads"] = table["1"]["bare_all_threads"]["rps"]
    cpu = {mode: min(table[str(c)][mode]["cpu_ms_per_req"] for c in CONCURRENCY) for mode in ("http", "inproc", "bare")}
    return {
        "by_concurrency": table,
        "best_rps": best,
        "http_vs_inproc": round(best["http"] / best["inproc"], 3),
        "inproc_vs_bare": round(best["inproc"] / best["bare"], 3),
        "http_vs_bare": round(best["http"] / best["bare"], 3),
        "bare_vs_bare_all_threads": round(best["bare"] / best["bare_all_threads"], 3),
        # CPU time per request is far less sensitive to a noisy neighbour than throughput is.
        "cpu_ms_per_req": cpu,
        "cpu_inproc_vs_http": round(cpu["inproc"] / cpu["http"], 3),
        "cpu_bare_vs_inproc": round(cpu["bare"] / cpu["inproc"], 3),
    }


# -- 3. big images ----------------------------------------------------------------------------------


def big_images(server: Server, seconds: float, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"640x480": [], "12MP": []}
    for r in range(rounds):
        order = [("640x480", SMALL), ("12MP", LARGE)]
        for key, path in order if r % 2 == 0 else order[::-1]:
            runs[key].append(wrk(server.url + "/detect", path, 1, seconds, server.pid))
    merged = {k: merge_rounds(v) for k, v in runs.items()}
    timings = {}
    for key, path in (("640x480", SMALL), ("12MP", LARGE)):
        _, body = server.post("/detect", path.read_bytes(), "image/jpeg")
        timings[key] = body["timing_ms"]
    return {
        "sizes_bytes": {"640x480": SMALL.stat().st_size, "12MP": LARGE.stat().st_size},
        "latency": merged,
        "server_timing_ms": timings,
        "p50_ratio": round(merged["12MP"]["p50_ms"] / merged["640x480"]["p50_ms"], 3),
        "p99_ratio": round(merged["12MP"]["p99_ms"] / merged["640x480"]["p99_ms"], 3),
    }


# -- 2. swaps under load, 4. memory over swaps --------------------------------------------------------


async def _activate(server: Server, name: str, version: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    status, _ = await asyncio.to_thread(server.post, f"/models/{name}/{version}/activate")
    return t0, time.perf_counter(), status


def _lat(samples: list[Sample]) -> list[float]:
    return [s.end - s.start for s in samples]


async def swaps_under_load(server: Server, name: str, swaps: int = 20, clients: int = 2,
                           steady_s: float = 4.0, gap_s: float = 0.3, after_s: float = 0.1) -> dict[str, Any]:
    load = Load("127.0.0.1", server.port, SMALL.read_bytes(), clients)
    load.start()
    await asyncio.sleep(0.5)
    steady_from = time.perf_counter()
    await asyncio.sleep(steady_s)
    steady_to = time.perf_counter()
    windows: list[tuple[float, float]] = []
    statuses = []
    for i in range(swaps):
        t0, t1, status = await _activate(server, name, "2" if i % 2 == 0 else "1")
        windows.append((t0, t1))
        statuses.append(status)
        await asyncio.sleep(gap_s)
    samples = await load.stop()
    steady = [s for s in samples if s.start >= steady_from and s.end <= steady_to]
    # "During a swap": overlapping the activate call, or started within `after_s` of its end (the
    # new model's first requests: lazily created per-thread state shows there).
    during = [s for s in samples if any(s.start < t1 + after_s and s.end > t0 for t0, t1 in windows)]
    failed = [s for s in samples if s.status != 200]
    st, du = percentiles(_lat(steady)), percentiles(_lat(during))
    swap_ms = [1000 * (t1 - t0) for t0, t1 in windows]
    return {
        "swaps": swaps, "clients": clients, "activate_failed": sum(1 for s in statuses if s != 200),
        "requests": len(samples), "failed": len(failed),
        "failed_statuses": sorted({s.status for s in failed}),
        "steady": {"n": len(steady), **st}, "during_swaps": {"n": len(during), **du},
        "p99_ratio": round(du["p99_ms"] / st["p99_ms"], 3) if steady and during else float("nan"),
        "swap_ms": percentiles(np.asarray(swap_ms) / 1000.0), "client_cpu_pct": load.cpu_pct,
    }


async def memory_over_swaps(server: Server, name: str, loaded_kb: int, swaps: int = 50) -> dict[str, Any]:
    """Under a light load (1 client): steady peak, then per swap the peak and the RSS after it."""
    load = Load("127.0.0.1", server.port, SMALL.read_bytes(), 1)
    load.start()
    await asyncio.sleep(1.0)
    reset_peak_rss(server.pid)
    await asyncio.sleep(3.0)
    steady_peak = read_status_kb(server.pid, "VmHWM")
    steady_rss = server.rss_kb()
    peaks, after = [], []
    for i in range(swaps):
        reset_peak_rss(server.pid)
        _, _, status = await _activate(server, name, "2" if i % 2 == 0 else "1")
        if status != 200:
            raise RuntimeError(f"activate failed with {status}")
        await asyncio.sleep(0.15)
        peaks.append(read_status_kb(server.pid, "VmHWM"))
        after.append(server.rss_kb())
    await load.stop()
    over = max(peaks) - steady_peak
    growth = float(memory_growth(after))
    slope = float(np.polyfit(np.arange(10, swaps), after[10:], 1)[0]) if swaps > 12 else float("nan")
    return {
        "swaps": swaps, "steady_peak_kb": steady_peak, "steady_rss_kb": steady_rss,
        "swap_peak_max_kb": max(peaks), "swap_peak_median_kb": int(np.median(peaks)),
        "peak_over_steady_kb": over, "median_peak_over_steady_kb": int(np.median(peaks)) - steady_peak,
        "loaded_kb": loaded_kb,
        "peak_over_steady_vs_loaded": round(over / loaded_kb, 3) if loaded_kb > 0 else float("nan"),
        "rss_after_swap_kb": after, "growth_kb": int(growth), "slope_kb_per_swap": round(slope, 1),
        "growth_vs_loaded": round(growth / loaded_kb, 3) if loaded_kb > 0 else float("nan"),
    }


# -- 5. start-up --------------------------------------------------------------------------------------


def startup(repeats: int = 3) -> dict[str, Any]:
    fresh, warm = [], []
    for i in range(repeats):
        with Server("startup", fresh=True) as s:
            fresh.append(s.ready_s)
            rss = s.rss_kb()
        with Server("startup", fresh=False) as s:
            warm.append(s.ready_s)
        log(f"start-up {i + 1}: fresh data dir {fresh[-1]:.2f} s, existing {warm[-1]:.2f} s")
    return {"fresh_s": [round(x, 3) for x in fresh], "existing_s": [round(x, 3) for x in warm],
            "fresh_median_s": round(float(np.median(fresh)), 3),
            "existing_median_s": round(float(np.median(warm)), 3), "rss_kb_at_ready": rss}


# -- the run ------------------------------------------------------------------------------------------


def bench_model(model: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    name, prefix = MODELS[model]
    log(f"== {model}: {MODEL_DESC[model]}")
    with Server(model, model=PKGS / f"{prefix}1", env=args.server_env) as server:
        log(f"{model}: server ready in {server.ready_s:.2f} s (bundled default + import); installing version 2")
        server.install(PKGS / f"{prefix}2", name, "2")
        inproc = InProc(PKGS / f"{prefix}1", SMALL, args.server_env)
        try:
            entry: dict[str, Any] = {"description": MODEL_DESC[model], "workers": inproc.info["workers"],
                                     "runtime_threads": inproc.info["runtime_threads"]}
            if "overhead" in args.only:
                entry["overhead"] = overhead(model, server, inproc, args.seconds, args.rounds)
            if "big" in args.only and model == "tiny-yolov3":
                entry["big_image"] = big_images(server, args.seconds, args.rounds)
                log(f"{model}: 12 MP / 640x480 p50 = {entry['big_image']['p50_ratio']:.2f}x")
            entry["steady_rss_kb"] = server.rss_kb()
            if "swap" in args.only:
                entry["swap"] = asyncio.run(swaps_under_load(server, name))
                sw = entry["swap"]
                log(f"{model}: swaps: {sw['failed']} failed of {sw['requests']}, p99 during/steady "
                    f"{sw['during_swaps']['p99_ms']:.1f}/{sw['steady']['p99_ms']:.1f} ms = {sw['p99_ratio']:.2f}x")
            if "memory" in args.only:
                size = inproc.ask(cmd="loaded_size", package=str(PKGS / f"{prefix}2"))
                entry["loaded_size"] = size
                entry["memory"] = asyncio.run(memory_over_swaps(server, name, size["loaded_kb"], args.swaps))
                # The same load/unload cycle without HTTP or traffic, heap trimmed after each:
                # tells a leak (live memory grows) from allocator retention (RSS swings).
                entry["memory"]["cycles"] = inproc.ask(cmd="cycles", package=str(PKGS / f"{prefix}2"),
                                                       n=args.swaps)
                mem = entry["memory"]
                log(f"{model}: loaded size {size['loaded_kb'] / 1024:.1f} MB; swap peak over steady "
                    f"{mem['peak_over_steady_kb'] / 1024:.1f} MB; growth over {args.swaps} swaps "
                    f"{mem['growth_kb'] / 1024:.1f} MB (live memory, trimmed: "
                    f"{mem['cycles']['growth_kb'] / 1024:.1f} MB)")
        finally:
            inproc.close()
        results["models"][model] = entry


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    m = results["models"]
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, limit: float, lower_is_better: bool, unit: str = "x") -> None:
        if measured is None or measured != measured:
            out.append({"target": name, "measured": None, "limit": limit, "unit": unit, "pass": None})
            return
        ok = measured <= limit if lower_is_better else measured >= limit
        out.append({"target": name, "measured": round(measured, 3), "limit": limit, "unit": unit, "pass": ok,
                    "direction": "<=" if lower_is_better else ">="})

    def get(*keys: str) -> Any:
        cur: Any = m
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return cur

    add("HTTP/in-process throughput, tiny-YOLOv3", get("tiny-yolov3", "overhead", "http_vs_inproc"), 0.85, False)
    add("HTTP/in-process throughput, BlazeFace", get("blazeface", "overhead", "http_vs_inproc"), 0.6, False)
    add("in-process/bare throughput, tiny-YOLOv3", get("tiny-yolov3", "overhead", "inproc_vs_bare"), 0.85, False)
    for model in MODELS:
        fails = get(model, "swap", "failed")
        add(f"failed requests during 20 swaps, {model}", fails, 0, True, "requests")
        add(f"p99 during swaps / steady p99, {model}", get(model, "swap", "p99_ratio"), 2.0, True)
    add("12 MP / 640x480 end-to-end p50, tiny-YOLOv3", get("tiny-yolov3", "big_image", "p50_ratio"), 3.0, True)
    for model in MODELS:
        add(f"swap peak RSS over steady / loaded size, {model}",
            get(model, "memory", "peak_over_steady_vs_loaded"), 1.3, True)
        add(f"RSS growth over 50 swaps / loaded size, {model}", get(model, "memory", "growth_vs_loaded"), 0.1, True)
        add(f"live-memory growth, 50 load/unload cycles, {model}",
            get(model, "memory", "cycles", "growth_vs_loaded"), 0.1, True)
    for model, sbs in results.get("sidebyside", {}).items():
        add(f"1 client p50, service / hand-rolled Flask, {model}", sbs["service_vs_flask_p50"], 1.0, True)
        add(f"1 client p50, service / bare runtime on all cores, {model}", sbs["service_vs_bare_p50"], 1.25, True)
        add(f"4 clients req/s, service / hand-rolled Flask, {model}", sbs["service_vs_flask_rps4"], 1.1, False)
    for kind, rows in results.get("bandwidth", {}).get("updates", {}).items():
        for name, row in rows.items():
            add(f"bytes fetched / today's package, {name}, {kind}", row["vs_today"], row["target"], True)
            add(f"assembly peak memory, {name}, {kind}", row["peak_mib"], 64, True, "MiB")
    st = results.get("startup")
    if st:
        add("start to /readyz, fresh data dir (median)", st["fresh_median_s"], 2.0, True, "s")
        add("start to /readyz, existing data dir (median)", st["existing_median_s"], 2.0, True, "s")
    return out


def print_tables(results: dict[str, Any]) -> None:
    print()
    if results.get("bandwidth"):
        import bandwidth

        bandwidth.print_tables(results["bandwidth"])
    if results.get("sidebyside"):
        import sidebyside

        print(sidebyside.table(results["sidebyside"]))
        print()
    for model, entry in results["models"].items():
        oh = entry.get("overhead")
        if not oh:
            continue
        print(f"{model}: {entry['description']} (workers {entry['workers']}, "
              f"runtime threads {entry['runtime_threads']})")
        print(f"  {'c':>2} | {'HTTP req/s':>10} {'p50':>7} {'p99':>7} | {'in-proc req/s':>13} {'p50':>7} "
              f"{'p99':>7} | {'bare req/s':>10} {'p50':>7} {'p99':>7} | {'HTTP/in':>7} {'in/bare':>7} | wrk CPU")
        for c, row in oh["by_concurrency"].items():
            h, i, b = row["http"], row["inproc"], row["bare"]
            print(f"  {c:>2} | {h['rps']:>10.1f} {h['p50_ms']:>7.1f} {h['p99_ms']:>7.1f} | {i['rps']:>13.1f} "
                  f"{i['p50_ms']:>7.1f} {i['p99_ms']:>7.1f} | {b['rps']:>10.1f} {b['p50_ms']:>7.1f} "
                  f"{b['p99_ms']:>7.1f} | {h['rps'] / i['rps']:>7.2f} {i['rps'] / b['rps']:>7.2f} | "
                  f"{h.get('loadgen_cpu_pct', 0):>4.0f}%")
        bt = oh["by_concurrency"]["1"]["bare_all_threads"]
        print(f"  best: HTTP/in-process {oh['http_vs_inproc']:.2f}, in-process/bare {oh['inproc_vs_bare']:.2f}; "
              f"bare 1 call x {os.cpu_count()} threads: {bt['rps']:.1f}/s, p50 {bt['p50_ms']:.1f} ms")
        print()
    print(f"{'target':<52} {'measured':>10} {'limit':>10}  result")
    for t in results["targets"]:
        mark = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        measured = "-" if t["measured"] is None else f"{t['measured']:g} {t['unit']}"
        print(f"{t['target']:<52} {measured:>10} {t.get('direction', '')}{t['limit']:>8g}  {mark}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edge-model-loader benchmarks (see docs/performance.md)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--swaps", type=int, default=50, help="swaps in the memory test")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--only", default="sidebyside,overhead,big,swap,memory,startup,bandwidth",
                        help="sections: sidebyside,overhead,big,swap,memory,startup,bandwidth")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the service and the in-process side, e.g. EDGELOADER_WORKERS=3 "
                             "or MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    args.only = set(args.only.split(","))
    if args.only - {"bandwidth"}:  # the bandwidth section builds its own models in seconds
        ensure_setup()
    t0 = time.perf_counter()
    import onnxruntime
    from ai_edge_litert import __version__ as litert_version

    results: dict[str, Any] = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "ai_edge_litert": litert_version, "seconds_per_measurement": args.seconds, "rounds": args.rounds,
            "images": {"640x480": SMALL.stat().st_size, "12MP": LARGE.stat().st_size} if SMALL.exists() else None,
            "server_env": args.server_env,
        },
        "models": {},
    }
    if "startup" in args.only:
        results["startup"] = startup()
    if "sidebyside" in args.only:
        import sidebyside

        results["sidebyside"] = {}
        for model in [m for m in args.models.split(",") if m in sidebyside.MODELS]:
            log(f"== side by side, {model}: bare runtime, hand-rolled Flask app, the service")
            results["sidebyside"][model] = sidebyside.side_by_side(model, args.seconds, args.rounds)
    if args.only & {"overhead", "big", "swap", "memory"}:
        for model in args.models.split(","):
            bench_model(model, args, results)
    if "bandwidth" in args.only:
        import bandwidth

        log("== bandwidth: bytes fetched per kind of model update")
        results["bandwidth"] = bandwidth.run()
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)
    log(f"done in {results['meta']['wall_s']:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
