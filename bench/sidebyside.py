"""One camera, one client: the service beside the bare runtime and a hand-rolled app, in one run.

For each model (SSD-MobileNetV2 TFLite, tiny-YOLOv3 ONNX), interleaved over ``--rounds`` rounds
(the order reversed every other round, so a neighbour's burst spreads over every column):

- bare     one ``runtime.run`` on a prepared tensor, every core (bench/inproc.py ``bare``, threads=cores):
           what the model costs, the floor for one client;
- flask    bench/handrolled.py: Flask, one interpreter/session made at start, OpenCV decode, JSON;
- service  ``edgeloader serve`` with its defaults;
- no-wide  the service with ``EDGELOADER_WIDE_LANE=false`` (every call on cores/workers threads: the
           plan before the wide lane).

Clients: 1 (wrk, one connection: p50) and 4 (four connections: requests/s). Figures are medians of
the rounds. ``python bench/sidebyside.py [--seconds 3] [--rounds 3] [--models ssd-mobilenet,tiny-yolov3]``
(bench/run.py runs it as its ``sidebyside`` section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, CACHE, ROOT, VENV_BIN, InProc, Server, free_port, merge_rounds, wrk

PKGS = CACHE / "packages"
IMAGE = CACHE / "photo_640x480.jpg"
MODELS = {"ssd-mobilenet": ("ssd-mobilenet-v1", "ssd_mobilenet.tflite"),
          "tiny-yolov3": ("tiny-yolov3-v1", "tiny_yolov3.onnx")}
COLUMNS = ("bare", "flask", "service", "no-wide")


def log(msg: str) -> None:
    print(f"[sidebyside {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class HandRolled:
    """bench/handrolled.py in its own process."""

    def __init__(self, model_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (CACHE / "run" / "handrolled.log").open("ab")
        self.proc = subprocess.Popen([str(VENV_BIN / "python"), str(BENCH / "handrolled.py"), str(model_file),
                                      str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("bench/handrolled.py exited; see bench/.cache/run/handrolled.log") from None
                time.sleep(0.05)
        raise TimeoutError("bench/handrolled.py did not answer in 60 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def side_by_side(model: str, seconds: float, rounds: int) -> dict[str, Any]:
    folder, model_file = MODELS[model]
    package = PKGS / folder
    cores = os.cpu_count() or 1
    service = Server(f"sbs-{model}", model=package).start()
    no_wide = Server(f"sbs-{model}-no-wide", model=package, env={"EDGELOADER_WIDE_LANE": "false"}).start()
    flask = HandRolled(package / model_file)
    inproc = InProc(package, IMAGE)
    urls = {"flask": flask.url, "service": service.url, "no-wide": no_wide.url}
    pids = {"flask": flask.proc.pid, "service": service.pid, "no-wide": no_wide.pid}
    try:
        for url in urls.values():  # warm every worker, connection and lane
            wrk(url + "/detect", IMAGE, 4, 1.0)
            wrk(url + "/detect", IMAGE, 1, 1.0)
        configs = [(c, col) for c in (1, 4) for col in COLUMNS if not (col == "bare" and c == 4)]
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {cfg: [] for cfg in configs}
        for r in range(rounds):
            for c, col in configs if r % 2 == 0 else configs[::-1]:
                if col == "bare":
                    res = inproc.ask(cmd="bare", c=1, seconds=seconds, threads=cores)
                else:
                    res = wrk(urls[col] + "/detect", IMAGE, c, seconds, pids[col])
                    if res["errors"]:
                        raise RuntimeError(f"{col}: {res['errors']} failed requests")
                runs[(c, col)].append(res)
        merged = {f"{col} c={c}": merge_rounds(lst) for (c, col), lst in runs.items()}
        with urllib.request.urlopen(urllib.request.Request(
                service.url + "/detect", data=IMAGE.read_bytes(), headers={"Content-Type": "image/jpeg"})) as resp:
            timing = json.loads(resp.read())["timing_ms"]
    finally:
        inproc.close()
        flask.close()
        service.stop()
        no_wide.stop()
    p50 = {col: merged[f"{col} c=1"]["p50_ms"] for col in COLUMNS}
    rps4 = {col: merged[f"{col} c=4"]["rps"] for col in COLUMNS if col != "bare"}
    return {
        "p50_ms_1_client": p50,
        "rps_4_clients": rps4,
        "service_vs_flask_p50": round(p50["service"] / p50["flask"], 3),
        "service_vs_bare_p50": round(p50["service"] / p50["bare"], 3),
        "service_vs_flask_rps4": round(rps4["service"] / rps4["flask"], 3),
        "no_wide_vs_flask_p50": round(p50["no-wide"] / p50["flask"], 3),
        "service_timing_ms": timing,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in merged.items()},
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | clients | bare runtime, all cores | hand-rolled Flask | service | service, no wide lane |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model, r in results.items():
        p, t = r["p50_ms_1_client"], r["rps_4_clients"]
        lines.append(f"| {model} | 1: p50 ms | {p['bare']:.1f} | {p['flask']:.1f} | **{p['service']:.1f}** "
                     f"({r['service_vs_flask_p50']:.2f}x Flask, {r['service_vs_bare_p50']:.2f}x bare) "
                     f"| {p['no-wide']:.1f} |")
        lines.append(f"| {model} | 4: req/s | | {t['flask']:.1f} | **{t['service']:.1f}** "
                     f"({r['service_vs_flask_rps4']:.2f}x Flask) | {t['no-wide']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=BENCH / "sidebyside.json")
    args = parser.parse_args(argv)
    results = {}
    for model in args.models.split(","):
        log(f"== {model}")
        results[model] = side_by_side(model, args.seconds, args.rounds)
        log(f"{model}: {json.dumps({k: results[model][k] for k in ('p50_ms_1_client', 'rps_4_clients')})}")
    print(table(results))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
