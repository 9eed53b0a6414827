"""/detect latency on the bundled BlazeFace: this checkout against another one, in one run.

    .venv/bin/python bench/detect_ab.py --src /tmp/before   # e.g. git archive <commit> | tar -x -C /tmp/before

Two servers (the other checkout's code, this one's) serve the bundled model on loopback; wrk posts
scikit-image's astronaut (512x512 JPEG, one face) with one connection, the two servers in turn,
``--rounds`` times in alternating order. Prints p50, p99 and requests/s of each, and their ratios.

On a shared machine wall-clock figures move by several per cent from run to run, so it also measures
the CPU time of the request's work in-process (decode, preprocess, inference, postprocess and the
response's detections, ``Engine._detect_sync``: thread CPU time, the best of many runs), each
checkout in its own process, alternately.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, ROOT, Server, wrk


def _body() -> Path:
    path = CACHE / "astronaut.jpg"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    return path


def run(src: Path, rounds: int, seconds: float, connections: int) -> dict[str, Any]:
    body = _body()
    # PYTHONPATH picks the code each server runs (ahead of any editable install of the package).
    sides = {"before": {"PYTHONPATH": str(src)}, "after": {"PYTHONPATH": str(ROOT)}}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    with (Server("ab-detect-before", env=sides["before"]) as before,
          Server("ab-detect-after", env=sides["after"]) as after):
        servers = {"before": before, "after": after}
        for name, server in servers.items():
            status, answer = server.post("/detect", body.read_bytes(), "image/jpeg")
            assert status == 200 and len(answer["detections"]) == 1, (name, status, answer)
            wrk(server.url + "/detect", body, connections, 1.0)  # warm up
        for r in range(rounds):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                runs[name].append(wrk(servers[name].url + "/detect", body, connections, seconds, servers[name].pid))
    out: dict[str, Any] = {"src": str(src), "rounds": rounds, "seconds": seconds, "connections": connections}
    for name, results in runs.items():
        out[name] = {k: round(statistics.median(r[k] for r in results), 3)
                     for k in ("p50_ms", "p99_ms", "rps", "cpu_ms_per_req")}
        out[name]["errors"] = sum(r["errors"] for r in results)
    out["ratio_after_over_before"] = {k: round(out["after"][k] / out["before"][k], 3)
                                      for k in ("p50_ms", "p99_ms", "rps", "cpu_ms_per_req")}
    return out


def inproc_worker(reps: int) -> dict[str, float]:
    """In this process (whichever checkout PYTHONPATH names): the CPU time of one request's work."""
    from supervisor.serving.engine import Engine
    from supervisor.serving.loader import load_and_warm
    from supervisor.settings import BUNDLED_MODEL_DIR

    engine = Engine(workers=1, runtime_threads=1)
    model = load_and_warm(BUNDLED_MODEL_DIR, 0.5, runtime_threads=1)
    body = _body().read_bytes()
    best = float("inf")
    for _ in range(15):
        t = time.thread_time()
        for _ in range(reps):
            engine._detect_sync(model, body, None, None, None)
        best = min(best, (time.thread_time() - t) / reps)
    engine.shutdown()
    return {"cpu_us_per_request": round(best * 1e6, 1)}


def inproc(src: Path, rounds: int, reps: int = 200) -> dict[str, Any]:
    results: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            env = {**os.environ, "PYTHONPATH": str(src if name == "before" else ROOT)}
            out = subprocess.run([sys.executable, __file__, "--inproc-worker", str(reps)], env=env, check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1])["cpu_us_per_request"])
    best = {k: min(v) for k, v in results.items()}
    ratio = round(best["after"] / best["before"], 3)
    return {"cpu_us_per_request": best, "runs": results, "ratio_after_over_before": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="the other checkout (before)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("--inproc-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inproc_worker:
        print(json.dumps(inproc_worker(args.inproc_worker)))
        return 0
    result = {"http": run(args.src.resolve(), args.rounds, args.seconds, args.connections),
              "in_process": inproc(args.src.resolve(), 4)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
