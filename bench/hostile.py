"""Hostile requests against a real server: memory and event-loop time they cost (issue 9).

    .venv/bin/python bench/hostile.py [--src TREE]

``--src`` runs the service from another checkout of this repository (a `git worktree` of an
older commit) for a before/after comparison on the same machine, in the same run.

Scenarios, each on a fresh server (loopback, bundled model):
- one 7000x7000 WebP (117 KB), one 7000x7000 PNG, one 4400x4400 palette BMP: peak RSS growth
  (VmHWM minus RSS before) and the answer's status;
- four 7000x7000 WebPs at once: peak RSS growth, slowest /healthz while they run;
- a multipart body of 100,000 tiny parts (6.8 MB): slowest /healthz while it is read.

``--per-pixel`` instead measures what one decode costs per pixel for each format (peak RSS growth
of a fresh process decoding a 3000x3000 image, over its pixels): the figures behind
``handlers/decodecost.py``.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Server, read_status_kb, reset_peak_rss


def _image(fmt: str, size: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "BMP":
        Image.new("P", (size, size), 3).save(buf, "BMP")
    else:
        Image.new("RGB", (size, size), (90, 120, 150)).save(buf, fmt, **({"quality": 10} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _post(url: str, body: bytes, ctype: str) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


class HealthProbe:
    """Polls /healthz every 20 ms in a thread; ``worst`` is the slowest answer seen."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self._stop = url + "/healthz", 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as r:
                r.read()
            self.worst = max(self.worst, time.perf_counter() - t0)
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _multipart(parts: int) -> tuple[bytes, str]:
    boundary = "b0undary"
    one = f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n'.encode()
    return one * parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run(src: Path | None) -> None:
    env = {"PYTHONPATH": str(src)} if src else {}
    label = f"from {src}" if src else "this checkout"
    print(f"hostile inputs, service {label}")
    for fmt, size in (("WEBP", 7000), ("PNG", 7000), ("BMP", 4400)):
        body = _image(fmt, size)
        with Server(f"hostile-{fmt.lower()}", env=env).start() as server:
            before = read_status_kb(server.pid, "VmRSS")
            reset_peak_rss(server.pid)
            status = _post(server.url + "/detect", body, "application/octet-stream")
            peak = read_status_kb(server.pid, "VmHWM")
            print(f"  one {size}x{size} {fmt:4} ({len(body) // 1024} KB): status {status}, "
                  f"peak RSS +{(peak - before) / 1024:.0f} MB")
    body = _image("WEBP", 7000)
    with Server("hostile-webp4", env=env).start() as server:
        before = read_status_kb(server.pid, "VmRSS")
        reset_peak_rss(server.pid)
        with HealthProbe(server.url) as probe, ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: _post(server.url + "/detect", body, "image/webp"), range(4)))
        peak = read_status_kb(server.pid, "VmHWM")
        print(f"  four 7000x7000 WEBP at once: statuses {sorted(statuses)}, peak RSS +{(peak - before) / 1024:.0f} MB, "
              f"slowest /healthz {probe.worst * 1000:.0f} ms")
    body, ctype = _multipart(100_000)
    with Server("hostile-multipart", env=env).start() as server:
        with HealthProbe(server.url) as probe:
            t0 = time.perf_counter()
            status = _post(server.url + "/detect", body, ctype)
            took = time.perf_counter() - t0
        print(f"  multipart of 100,000 parts ({len(body) / 1e6:.1f} MB): status {status} in {took * 1000:.0f} ms, "
              f"slowest /healthz {probe.worst * 1000:.0f} ms")


_PER_PIXEL = """
import io, resource, sys
from PIL import Image
from handlers.imaging import decode_image
fmt = sys.argv[1]
img = Image.new("RGB", (3000, 3000), (90, 120, 150)) if fmt != "BMP" else Image.new("P", (3000, 3000), 3)
buf = io.BytesIO(); img.save(buf, fmt); data = buf.getvalue(); del img, buf
def rss_kb(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
before = rss_kb()
open("/proc/self/clear_refs", "w").write("5")
decode_image(data, (128, 128) if fmt == "JPEG" else None, 10**9)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print((peak - before) * 1024 / 9e6)
"""


def per_pixel() -> None:
    import subprocess

    print("peak bytes per decoded pixel (3000x3000, fresh process; JPEG at draft size for a 128 input):")
    for fmt in ("JPEG", "PNG", "BMP", "WEBP"):
        out = subprocess.run([sys.executable, "-c", _PER_PIXEL, fmt], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        print(f"  {fmt:5} {float(out.stdout):5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="run the service from this checkout (before/after)")
    parser.add_argument("--per-pixel", action="store_true", help="bytes per pixel of one decode, by format")
    args = parser.parse_args()
    if args.per_pixel:
        per_pixel()
    else:
        run(args.src.resolve() if args.src else None)


if __name__ == "__main__":
    main()
