"""Crash safety: a real `edgeloader serve` process is killed with SIGKILL at random moments of
updates (and of its own start-up), many times. After every restart it is ready, serves a complete
model, and has cleaned what the killed process left in staging. An update cut short is finished
after the restart: after the last (clean) restart, the last package dropped is the active model.

Two campaigns: a tiny model beside 6 MB of padding, and a model with 6 MB of weights of its own
(issue 16), large enough for the ONNX optimised-model cache: every install writes a 6 MB cache
(graph and external data), and kills land in those writes too; a cache cut short must never keep a
version from loading."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from packages import ROOT, ssd_files, zip_bytes

BUNDLED = ("blazeface-short-range", "1")
ITERATIONS = (12, 25)  # at least, at most
BUDGET_S = 40.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python -m supervisor serve` on a data dir, started and killed by the test."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "EDGELOADER_SETTLE_SECONDS": "0.1",
            "EDGELOADER_WORKERS": "1",
            "EDGELOADER_RUNTIME_THREADS": "1",
            "EDGELOADER_LOG_FORMAT": "json",
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "serve", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--twin", "off"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers={"Content-Type": "image/jpeg"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, within: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"the service exited; see {self.log}"
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    return body
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise AssertionError(f"not ready within {within}s; see {self.log}")


# Random weights make the package big enough (unpack, hashes, copy) for kills to land inside an
# update; random bytes, because highly compressible padding would be refused as a zip bomb.
PADDING = random.Random(0).randbytes(6_000_000)


def drop(inbox: Path, version: int, kind: str = "padded") -> str:
    """Drop package `version` the way a careful copier does (write aside, rename in)."""
    name = f"update-{version}.zip"
    if kind == "big-onnx":
        files = ssd_files("tiny-ssd", str(version), big=True)
    else:
        files = ssd_files("tiny-ssd", str(version), extra_files={"weights.bin": PADDING})
    part = inbox / f"{name}.part"
    part.write_bytes(zip_bytes(files))
    os.rename(part, inbox / name)
    return name


def leftovers(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "staging").glob(".tmp-*")} | {p.name for p in data_dir.glob("*.tmp-*")}


def wait_log(log: Path, offset: int, needle: str, within: float) -> bool:
    """Whether ``needle`` shows up in the log after ``offset`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            if needle.encode() in f.read():
                return True
        time.sleep(0.003)
    return False


def wait_path(folder: Path, pattern: str, within: float) -> bool:
    """Whether something matching ``pattern`` shows up under ``folder`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(folder.glob(pattern)):
            return True
        time.sleep(0.002)
    return False


def processing_seconds(log: Path, package: str) -> float:
    """From the pipeline taking ``package`` to its removal (the last step), from the service log."""
    times = {}
    for line in log.read_text().splitlines():
        if line.startswith("{") and f'"{package}"' in line:
            entry = json.loads(line)
            if entry.get("event") in ("package_complete", "model_event"):
                times.setdefault(entry.get("state", "complete"), entry.get("at") or time.time())
    return max(0.02, times["active"] - times["received"]) * 1.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["padded", "big-onnx"])
def test_kill_at_random_moments_and_restart(tmp_path: Path, photo: bytes, kind: str) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time()))
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    inbox = data_dir / "inbox"
    log = tmp_path / "service.log"
    service = Service(data_dir, log)
    dropped = 0
    kills = {"startup": 0, "before-update": 0, "in-update": 0}
    weights = [2, 2, 6]
    if kind == "big-onnx":
        kills["in-cache-write"] = 0  # aimed at the optimised-model cache being written
        weights = [2, 2, 3, 3]
    served: set[tuple[str, str]] = set()
    cut_in_cache = 0
    started = time.monotonic()
    try:
        service.start()
        service.wait_ready()
        # One clean update first, to time one: kills inside updates are spread over that time.
        dropped += 1
        drop(inbox, dropped, kind)
        while service.wait_ready()["model"]["version"] != "1" or any(inbox.iterdir()):
            time.sleep(0.01)
        update_s = processing_seconds(log, "update-1.zip")
        iteration = 0
        while iteration < ITERATIONS[1] and (iteration < ITERATIONS[0] or time.monotonic() - started < BUDGET_S):
            iteration += 1
            mode = rng.choices(list(kills), weights=weights)[0]
            kills[mode] += 1
            offset = log.stat().st_size
            if mode == "startup":
                # Killed during its own start: repair, bundled install, loading, the first scan.
                service.kill()
                service.start()
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                # An update: drop the next package unless the last one is still waiting.
                pending = sorted(p.name for p in inbox.glob("update-*.zip"))
                if not pending:
                    dropped += 1
                    pending = [drop(inbox, dropped, kind)]
                if mode == "before-update":
                    time.sleep(rng.uniform(0.0, 0.3))
                elif mode == "in-cache-write":
                    wait_path(data_dir / "staging", ".tmp-*/.ort-cache", within=5.0)
                    time.sleep(rng.uniform(0.0, 0.1))
                else:
                    # From the moment the pipeline takes the package to a little past its usual end.
                    wait_log(log, offset, f'"package": "{pending[0]}"', within=5.0)
                    time.sleep(rng.uniform(0.0, update_s))
            service.kill()
            left = leftovers(data_dir)
            # A kill that cut an install after its model's optimised cache was started (in the workdir).
            cut_in_cache += any((data_dir / "staging").glob(".tmp-*/.ort-cache"))
            service.start()
            ready = service.wait_ready()
            model = (ready["model"]["name"], ready["model"]["version"])
            assert model == BUNDLED or (model[0] == "tiny-ssd" and 1 <= int(model[1]) <= dropped), model
            status, body = service.request("POST", "/detect", photo)
            assert status == 200, body
            assert body["model"]["name"] in (BUNDLED[0], "tiny-ssd")
            served.add((body["model"]["name"], body["model"]["version"]))
            still_there = left & leftovers(data_dir)
            assert not still_there, f"iteration {iteration}: crash leftovers not cleaned: {still_there}"
            assert (data_dir / "current" / ".edgeloader.json").is_file(), "current must be a complete version"
        # The last restart is clean: the waiting package (if any) is finished.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready = service.request("GET", "/readyz")[1]
            if not any(inbox.glob("update-*")) and ready["model"] == {"name": "tiny-ssd", "version": str(dropped)}:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"package {dropped} did not become active; readyz {ready}; see {log}")
        status, body = service.request("POST", "/detect", photo)
        assert status == 200 and body["model"] == {"name": "tiny-ssd", "version": str(dropped)}
        _, models = service.request("GET", "/models")
        assert models["rejected"] == [], "a crash must never get a good package quarantined"
        if kind == "big-onnx":  # the optimised-model cache was in play, and the version serves from one
            caches = list((data_dir / "current" / ".ort-cache").glob("*.ortopt"))
            assert caches, "the big model must load through the optimised-model cache"
            assert log.read_text().count('"onnx_cache_written"') >= 2
    finally:
        service.stop()
    repaired = log.read_text().count('"repository_repaired"')
    print(f"\ncrash test {kind} (CRASH_SEED={seed}): {iteration} kills {kills}, {dropped} packages, "
          f"{repaired} restarts found crash leftovers, update ~{update_s:.2f}s, "
          f"{time.monotonic() - started:.1f}s, served {len(served)} versions, "
          f"{cut_in_cache} kills after a cache was begun")
    assert iteration >= ITERATIONS[0] and dropped >= 3
