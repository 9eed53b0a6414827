"""Shared benchmark plumbing: the service as a subprocess, wrk, memory probes, statistics.

Everything runs on loopback and every load is bounded in time. The machine is small (2 cores)
and shared, so comparisons are taken in one run, interleaved, and reported as ratios.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BENCH",
    "CACHE",
    "ROOT",
    "Server",
    "free_port",
    "percentiles",
    "read_status_kb",
    "reset_peak_rss",
    "wrk",
]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
VENV_BIN = Path(sys.executable).parent
POST_LUA = BENCH / "post.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds of latencies given in seconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan"), "max_ms": float("nan")}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50_ms": round(float(p50), 2), "p90_ms": round(float(p90), 2), "p99_ms": round(float(p99), 2),
            "mean_ms": round(float(a.mean()), 2), "max_ms": round(float(a.max()), 2)}


# -- memory -----------------------------------------------------------------------------------------


def read_status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status: VmRSS (now) or VmHWM (peak since start or last reset)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (from /proc, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the service ------------------------------------------------------------------------------------


@dataclass
class Server:
    """``edgeloader serve`` on loopback with its own data dir; logs go to a file."""

    name: str
    model: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    fresh: bool = True
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_s: float = float("nan")

    @property
    def data_dir(self) -> Path:
        return CACHE / "run" / self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Server:
        if self.fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "EDGELOADER_TWIN": "off", "EDGELOADER_LOG_FORMAT": "json",
               "EDGELOADER_SETTLE_SECONDS": "0.2", **self.env}
        cmd = [str(VENV_BIN / "edgeloader"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        log = (self.data_dir.parent / f"{self.name}.log").open("ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        self.ready_s = self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> float:
        deadline = self.started_at + timeout
        while time.perf_counter() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: server exited with {self.proc.returncode}; see its log")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started_at
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.005)
        raise TimeoutError(f"{self.name}: not ready after {timeout} s")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes = b"", ctype: str = "application/json") -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method="POST", headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def install(self, package: Path, name: str, version: str, timeout: float = 60.0) -> None:
        """Drop a package folder into the inbox and wait until the repository lists it."""
        staging = self.data_dir / f".drop-{package.name}"
        shutil.copytree(package, staging)
        staging.rename(self.data_dir / "inbox" / package.name)
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if any(v["name"] == name and v["version"] == version for v in self.get("/models")["versions"]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{package.name} was not installed; see {self.data_dir.parent / (self.name + '.log')}")

    def rss_kb(self) -> int:
        return read_status_kb(self.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- wrk ---------------------------------------------------------------------------------------------


def wrk(url: str, body: Path, connections: int, seconds: float, server_pid: int | None = None) -> dict[str, Any]:
    """POST ``body`` as image/jpeg with ``connections`` keep-alive connections for ``seconds``.

    One wrk thread is plenty (it is C and epoll; its own CPU use is measured and reported)."""
    env = {**os.environ, "BENCH_BODY": str(body)}
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(POST_LUA),
         url],
        capture_output=True, text=True, env=env, check=True, timeout=seconds + 60,
    )
    wall = time.perf_counter() - t0
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    duration = raw["duration_us"] / 1e6
    requests = raw["requests"]
    errors = sum(raw[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status",
                                  "errors_timeout"))
    loadgen_cpu = (after_children.ru_utime - before_children.ru_utime) + (
        after_children.ru_stime - before_children.ru_stime)
    result = {
        "requests": requests,
        "errors": errors,
        "rps": round(requests / duration, 2) if duration else 0.0,
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p90_ms": round(raw["p90_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "mean_ms": round(raw["mean_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
        "seconds": round(duration, 2),
        # The load generator's share of one core over the run: proof it is not the bottleneck.
        "loadgen_cpu_pct": round(100 * loadgen_cpu / wall, 1),
    }
    if server_pid:
        server_cpu = cpu_seconds(server_pid) - server_cpu0
        result["server_cpu_pct"] = round(100 * server_cpu / duration, 1)
        result["cpu_ms_per_req"] = round(1000 * server_cpu / requests, 2) if requests else float("nan")
    return result


def memory_growth(after: list[int], settle: int = 5) -> int:
    """How much the typical RSS of the second half of a series is above the first half's (after
    ``settle`` values), by medians.

    RSS between swaps swings with what the allocator keeps (a tiny-YOLOv3 process swings 150-230 MB
    over 150 cycles without the image's malloc setting). A leak moves the whole second half up. The
    earlier measure, floor against floor, read one low value in the first half as growth (a flat
    271 MB series with a single 258 MB dip gave +13.5 MB); medians are not moved by one value."""
    if len(after) < 2 * settle + 2:
        return after[-1] - after[0]
    half = max(len(after) // 2, settle + 1)
    return int(statistics.median(after[half:]) - statistics.median(after[settle:half]))


# -- the in-process side and merging rounds ---------------------------------------------------------


class InProc:
    """bench/inproc.py as a subprocess: one JSON command per line, one JSON answer per line."""

    def __init__(self, package: Path, image: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "inproc.py"), str(package), str(image)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
            env={**os.environ, "EDGELOADER_TWIN": "off", **(env or {})},
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench/inproc.py died; run it by hand to see why")
        return dict(json.loads(line))

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(30)


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one configuration: medians over rounds (robust to a neighbour's burst of load)."""
    out: dict[str, Any] = {"requests": sum(r["requests"] for r in runs),
                           "errors": sum(r.get("errors", 0) for r in runs)}
    for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "cpu_ms_per_req", "loadgen_cpu_pct",
                "server_cpu_pct"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = round(float(np.median(vals)), 2)
    out["rounds"] = runs
    return out
