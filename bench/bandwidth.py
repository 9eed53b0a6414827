"""Bytes over the link for a model update: what a device holding the previous version fetches, as a
fraction of the new package, for the updates operators make (issue 14).

Two detectors of realistic size with random float32 weights, built here in a second with numpy (no
torch, no TensorFlow): a YOLO-style ONNX convolution stack (3.0 M parameters, 12 MB, ``onnx.helper``)
and a MobileNetV1-SSD TFLite (3.4 M parameters, 13 MB, the flatbuffer writer of bench/models.py).
Each is packed with ``edgeloader pack`` as version 1 and "installed" (unpacked as the pipeline does);
each update is packed as version 2 and fetched by the device's ``IncrementalDownload`` from a local
HTTP server with Range, ETag and If-Match (aiohttp's file response, in a subprocess, so its CPU is not
counted):

- repack: the same files, a new version;  labels: one class renamed;  threshold: score_threshold;
- head: the last layer retrained;  half: the later layers holding about half of the weights retrained;
- full: every weight retrained;  unrelated: the device holds only the other model (nothing reusable).

For each: bytes fetched / package size, requests, and the device's CPU time and peak memory (RSS
above what it was before) for planning, cutting its stored files (cold chunk cache), re-deflating the
reused chunks, fetching, writing and verifying. Two comparisons explain the design: how much of each
update three chunkings could reuse (content-defined, fixed 64 KiB, fixed 64 KiB restarted at each
tensor), including a re-export that shifts every tensor by a few bytes; and what compression gives on
the weights (deflate as the zip holds it, the per-chunk RLE deflate the package uses, LZMA with 4-byte
literal positions, zstd and byte-grouped deflate as ZipNN does, when available).

``python bench/bandwidth.py`` prints the tables and writes bench/bandwidth.json; ``bench/run.py``
runs it as its ``bandwidth`` section.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import lzma
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import free_port, read_status_kb, reset_peak_rss  # noqa: E402

OUT = HERE / "bandwidth.json"
TARGETS = {"repack": 0.01, "threshold": 0.01, "labels": 0.01, "head": 0.15, "half": 0.60, "full": 0.95,
           "unrelated": 1.05}
LABELS = [f"class_{i}" for i in range(20)]


# -- models ---------------------------------------------------------------------------------------------


def _weights(seed: int, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)


# YOLO-style stack: (cin, cout, kernel, maxpool after)
_ONNX_LAYERS = [(3, 16, 3, True), (16, 32, 3, True), (32, 64, 3, True), (64, 128, 3, True), (128, 256, 3, True),
                (256, 512, 3, True), (512, 256, 1, False), (256, 512, 3, False), (512, 255, 1, False)]


def build_onnx(seeds: list[int], producer: str = "bench") -> tuple[bytes, list[bytes]]:
    """(model bytes, each layer's weight bytes)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, blobs = [], [], []
    x = "images"
    for i, ((cin, cout, k, pool), seed) in enumerate(zip(_ONNX_LAYERS, seeds, strict=True)):
        w = _weights(seed, (cout, cin, k, k), cin * k * k)
        b = _weights(seed + 10_000, (cout,), cout) * 0.01
        blobs.append(w.tobytes() + b.tobytes())
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"],
                                      pads=[k // 2] * 4, name=f"conv{i}"))
        y = f"c{i}"
        if i < len(_ONNX_LAYERS) - 1:
            nodes.append(helper.make_node("LeakyRelu", [y], [f"a{i}"], alpha=0.1))
            y = f"a{i}"
            if pool:
                nodes.append(helper.make_node("MaxPool", [y], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
                y = f"p{i}"
        x = y
    graph = helper.make_graph(nodes, "bench_yolo",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 416, 416])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 255, 13, 13])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name=producer)
    model.ir_version = 8
    return model.SerializeToString(), blobs


# MobileNetV1 (depthwise + pointwise pairs) with SSD predictors on the last map, 20 classes.
_MOBILENET = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
              (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
              (1024, 1024, 1)]


def _tflite_layers() -> int:
    return 1 + len(_MOBILENET) + 2


def build_tflite(seeds: list[int], description: str = "bench") -> tuple[bytes, list[bytes]]:
    from ai_edge_litert.tools import flatbuffer_utils
    from models import _TfliteWriter

    w = _TfliteWriter(0)
    first = len(w.buffers)

    def layer(seed: int) -> None:
        w.rng = np.random.default_rng(seed)

    layer(seeds[0])
    y, shape = w.conv(w.tensor("input", [1, 300, 300, 3]), [1, 300, 300, 3], 32, 3, 2, True, "conv0")
    inp = 0
    for i, ((_cin, cout, stride), seed) in enumerate(zip(_MOBILENET, seeds[1:], strict=False)):
        layer(seed)
        y, shape = w.dwconv(y, shape, stride, f"dw{i}")
        y, shape = w.conv(y, shape, cout, 1, 1, True, f"pw{i}")
    anchors, classes = 6, len(LABELS) + 1
    layer(seeds[-2])
    boxes, _ = w.conv(y, shape, anchors * 4, 1, 1, False, "BoxPredictor")
    layer(seeds[-1])
    scores, _ = w.conv(y, shape, anchors * classes, 1, 1, False, "ClassPredictor")
    model = w.model([inp], [boxes, scores], description)
    blobs = [bytes(b.data) for b in w.buffers[first:] if b.data is not None]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), blobs


MODELS: dict[str, tuple[Callable[..., tuple[bytes, list[bytes]]], str, int]] = {
    "onnx": (build_onnx, "model.onnx", len(_ONNX_LAYERS)),
    "tflite": (build_tflite, "model.tflite", _tflite_layers()),
}


def _layer_bytes(kind: str) -> list[int]:
    build, _, n = MODELS[kind]
    if kind == "onnx":
        return [len(b) for b in build(list(range(n)))[1]]
    # TFLite: conv0, then dw+pw per block, then the two predictors.
    _, blobs = build(list(range(n)))
    sizes = [len(blobs[0]) + len(blobs[1])]
    rest = blobs[2:]
    for i in range(len(_MOBILENET)):
        sizes.append(sum(len(b) for b in rest[4 * i: 4 * i + 4]))
    sizes += [len(rest[-4]) + len(rest[-3]), len(rest[-2]) + len(rest[-1])]
    return sizes


def scenarios(kind: str) -> dict[str, dict[str, Any]]:
    """Name -> what version 2 changes from version 1 (seeds per layer, labels, threshold)."""
    _, _, n = MODELS[kind]
    base = list(range(1, n + 1))
    sizes = _layer_bytes(kind)
    total = sum(sizes)
    # "half": the later layers whose weights are closest to half of all weights.
    suffix, best = 0, (1.0, 1)
    for k in range(1, n + 1):
        suffix += sizes[-k]
        best = min(best, (abs(suffix / total - 0.5), k))
    half = best[1]
    return {
        "repack": {"seeds": base},
        "labels": {"seeds": base, "labels": [*LABELS[:-1], "renamed"]},
        "threshold": {"seeds": base, "threshold": 0.35},
        "head": {"seeds": [*base[:-1], 1000], "changed": sizes[-1] / total},
        "half": {"seeds": base[:-half] + [1000 + i for i in range(half)],
                 "changed": sum(sizes[-half:]) / total},
        "full": {"seeds": [1000 + i for i in range(n)], "changed": 1.0},
        "unrelated": {"seeds": base},  # the device holds the other model only
    }


# -- packages and the device side ------------------------------------------------------------------------


def make_package(folder: Path, kind: str, version: str, seeds: list[int], labels: list[str] = LABELS,
                 threshold: float = 0.5, *options: str) -> Path:
    from supervisor.cli.pack import pack_main

    build, model_name, _ = MODELS[kind]
    src = folder / f"src-{kind}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / model_name).write_bytes(build(seeds)[0])
    (src / "labels.txt").write_text("\n".join(labels) + "\n")
    out = folder / f"{kind}-{version}.zip"
    code = pack_main([str(src), "-o", str(out), "--name", f"bench-{kind}", "--version", version,
                      "--score-threshold", str(threshold), "--no-verify", *options])
    assert code == 0
    return out


def _is_lzma(package: Path) -> bool:
    with zipfile.ZipFile(package) as zf:
        return any(i.compress_type == zipfile.ZIP_LZMA for i in zf.infolist())


def install(package: Path, where: Path) -> list[tuple[Path, str]]:
    from supervisor.package.reader import file_sha256

    with zipfile.ZipFile(package) as zf:
        zf.extractall(where)
    return [(p, file_sha256(p)) for p in sorted(where.iterdir()) if p.stat().st_size >= 256 * 1024]


def serve(folder: Path, port: int) -> None:
    from aiohttp import web

    async def blob(request: web.Request) -> web.FileResponse:
        return web.FileResponse(folder / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", blob)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def fetch_in_a_process(url: str, part: Path, seeds: list[tuple[Path, str]], package: Path) -> dict[str, Any]:
    """``fetch`` in a fresh interpreter: its peak RSS over its RSS before the fetch (imports done) is
    what assembling the package costs, free of what earlier work left in this process's heap."""
    job = json.dumps({"url": url, "part": str(part), "seeds": [[str(p), s] for p, s in seeds],
                      "package": str(package)})
    proc = subprocess.run([sys.executable, __file__, "--fetch", job], capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


async def fetch(url: str, part: Path, seeds: list[tuple[Path, str]], package: Path) -> dict[str, Any]:
    from supervisor.package.reader import file_sha256
    from supervisor.twin.incremental import IncrementalDownload

    size = package.stat().st_size
    download = IncrementalDownload(url, part, seeds=lambda: seeds, expected_length=size,
                                   sha256=file_sha256(package), read_timeout=30.0)
    pid = os.getpid()
    rss_before = read_status_kb(pid, "VmRSS")
    reset_peak_rss(pid)
    cpu = time.process_time()
    wall = time.perf_counter()
    result = await download.run()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    peak = read_status_kb(pid, "VmHWM") - rss_before
    assert result.size == size
    return {
        "package_bytes": size, "fetched_bytes": download.bytes_fetched, "reused_bytes": download.bytes_reused,
        "fraction": round(download.bytes_fetched / size, 4), "mode": download.mode,
        "requests": download.attempts, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
        "peak_mib": round(peak / 1024, 1),
    }


# -- the two comparisons -----------------------------------------------------------------------------------


def _reuse(old: list[tuple[int, int, str]], new: list[tuple[int, int, str]]) -> float:
    have = {d for _, _, d in old}
    return sum(n for _, n, d in new if d in have) / max(1, sum(n for _, n, _ in new))


def _fixed(data: bytes, starts: list[int], step: int = 64 * 1024) -> list[tuple[int, int, str]]:
    from supervisor.package.chunking import digest

    cuts = sorted({0, len(data), *starts, *range(0, len(data), step)})
    if starts:  # restart the grid at every tensor: cuts at tensor starts, then every `step` inside it
        cuts = [0]
        marks = sorted({*starts, len(data)})
        prev = 0
        for m in marks:
            cuts += [*list(range(prev, m, step))[1:], m]
            prev = m
        cuts = sorted(set(cuts))
    return [(a, b - a, digest(data[a:b])) for a, b in itertools.pairwise(cuts) if b > a]


def chunking_comparison(kind: str) -> dict[str, dict[str, float]]:
    from supervisor.package.chunking import ChunkParams, chunk_bytes

    build, _, n = MODELS[kind]
    base = list(range(1, n + 1))
    old, old_blobs = build(base)
    variants = {name: build(spec["seeds"]) for name, spec in scenarios(kind).items()
                if name in ("head", "half")}
    # A re-export: the same weights, a longer producer string or description: every tensor shifts.
    variants["re-export"] = build(base, "bench re-exported by converter 2.1.7")
    out: dict[str, dict[str, float]] = {}
    params = ChunkParams()

    def tensor_starts(data: bytes, blobs: list[bytes]) -> list[int]:
        return [p for b in blobs if (p := data.find(b[:64])) >= 0] + \
               [p + len(b) for b in blobs if (p := data.find(b[:64])) >= 0]

    for name, (new, new_blobs) in variants.items():
        cdc = _reuse([(c.offset, c.length, c.digest) for c in chunk_bytes(old, params)],
                     [(c.offset, c.length, c.digest) for c in chunk_bytes(new, params)])
        fixed = _reuse(_fixed(old, []), _fixed(new, []))
        tensors = _reuse(_fixed(old, tensor_starts(old, old_blobs)), _fixed(new, tensor_starts(new, new_blobs)))
        out[name] = {"content_defined": round(cdc, 4), "fixed_64k": round(fixed, 4),
                     "tensor_aligned_64k": round(tensors, 4)}
    return out


def compression_comparison(kind: str) -> dict[str, float | str]:
    from supervisor.package.indexed import encode_chunk

    data = MODELS[kind][0](list(range(1, MODELS[kind][2] + 1)))[0]
    n = len(data)
    out: dict[str, float | str] = {}
    out["deflate level 6 (zip default)"] = len(zlib.compress(data, 6)) / n
    out["deflate RLE per 48 KiB chunk (the package)"] = sum(
        len(encode_chunk(data[i:i + 49152])) for i in range(0, n, 49152)) / n
    out["lzma, 4-byte literal positions (zip method 14)"] = len(lzma.compress(
        data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA1, "lc": 0, "lp": 2, "pb": 2}])) / n
    grouped = np.frombuffer(data[: n // 4 * 4], np.uint8).reshape(-1, 4).T.tobytes()
    out["byte-grouped + deflate (ZipNN's idea)"] = len(zlib.compress(grouped, 6)) / n
    try:
        import zstandard  # not a dependency: measured when installed

        out["zstd level 19"] = len(zstandard.ZstdCompressor(level=19).compress(data)) / n
        out["byte-grouped + zstd level 3"] = len(zstandard.ZstdCompressor(level=3).compress(grouped)) / n
    except ImportError:
        out["zstd"] = "not installed"
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# -- run ----------------------------------------------------------------------------------------------------


async def _run_updates(work: Path, url_base: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    v1 = {kind: make_package(work / "pkgs", kind, "1", list(range(1, MODELS[kind][2] + 1))) for kind in MODELS}
    for kind in MODELS:
        other = "tflite" if kind == "onnx" else "onnx"
        results[kind] = {}
        for name, spec in scenarios(kind).items():
            version = f"2{name}"
            # As an operator would: `pack --previous` (compression auto) with the package devices hold.
            package = make_package(work / "pkgs", kind, version, spec["seeds"], spec.get("labels", LABELS),
                                   spec.get("threshold", 0.5), "--previous", str(v1[kind]))
            # Today's package of the same files (a plain deflated zip): what every update cost before.
            today = make_package(work / "today", kind, version, spec["seeds"], spec.get("labels", LABELS),
                                 spec.get("threshold", 0.5), "--no-index").stat().st_size
            device = work / "device" / f"{kind}-{name}"
            seeds = install(v1[other if name == "unrelated" else kind], device / "models" / "1")
            (device / "staging").mkdir(parents=True)
            figures = await asyncio.to_thread(
                fetch_in_a_process, f"{url_base}/{package.relative_to(work / 'pkgs')}",
                device / "staging" / f"{package.name}.part", seeds, package)
            figures["changed_weights"] = round(spec.get("changed", 0.0), 4)
            figures["today_package_bytes"] = today
            figures["vs_today"] = round(figures["fetched_bytes"] / today, 4)
            figures["compression"] = "lzma" if _is_lzma(package) else "chunked"
            figures["target"] = TARGETS[name]
            # Against the whole download every update cost until now (today's package of the same files).
            figures["pass"] = figures["vs_today"] <= TARGETS[name] and figures["peak_mib"] <= 64
            results[kind][name] = figures
            print(f"  {kind:6} {name:9} fetched {figures['vs_today']:7.2%} of today's package "
                  f"{today / 1e6:5.1f} MB, {figures['fraction']:7.2%} of {figures['package_bytes'] / 1e6:5.1f} MB"
                  f" ({figures['mode']}, {figures['requests']} requests), CPU {figures['cpu_s']:.2f} s, "
                  f"peak +{figures['peak_mib']} MiB", flush=True)
    return results


def run() -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeloader-bandwidth-") as tmp:
        work = Path(tmp)
        (work / "pkgs").mkdir()
        (work / "today").mkdir()
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(work / "pkgs"), "--port", str(port)])
        try:
            _wait(port)
            updates = asyncio.run(_run_updates(work, f"http://127.0.0.1:{port}"))
        finally:
            server.terminate()
            server.wait(10)
    results = {
        "models": {kind: {"package_bytes": updates[kind]["repack"]["package_bytes"],
                          "model_bytes": len(MODELS[kind][0](list(range(1, MODELS[kind][2] + 1)))[0])}
                   for kind in MODELS},
        "updates": updates,
        "chunking": {kind: chunking_comparison(kind) for kind in MODELS},
        "compression": {kind: compression_comparison(kind) for kind in MODELS},
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return results


def _wait(port: int) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the blob server did not start")


def print_tables(results: dict[str, Any]) -> None:
    print("\nBytes fetched for an update (device holds version 1): as a fraction of today's package of the same"
          " files (a plain deflated zip, what every update cost until now) and of the new package")
    print(f"{'model':7} {'update':10} {'packed':8} {'changed':>8} {'vs today':>9} {'vs new':>8} {'target':>7} "
          f"{'requests':>8} {'CPU s':>6} {'peak MiB':>8}  ok")
    for kind, rows in results["updates"].items():
        for name, r in rows.items():
            print(f"{kind:7} {name:10} {r['compression']:8} {r['changed_weights']:8.1%} {r['vs_today']:9.2%} "
                  f"{r['fraction']:8.2%} {r['target']:7.0%} {r['requests']:8d} {r['cpu_s']:6.2f} "
                  f"{r['peak_mib']:8.1f}  {'yes' if r['pass'] else 'NO'}")
    print("\nShare of the new model file reusable, by chunking (content-defined is what packages use)")
    for kind, rows in results["chunking"].items():
        for name, r in rows.items():
            print(f"{kind:7} {name:10} " + "  ".join(f"{k} {v:.1%}" for k, v in r.items()))
    print("\nCompressed size / model size (float32 weights)")
    for kind, rows in results["compression"].items():
        for name, v in rows.items():
            print(f"{kind:7} {name:48} {v if isinstance(v, str) else f'{v:.4f}'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fetch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    if args.fetch:
        import aiohttp  # noqa: F401 - imported before the baseline is taken

        import supervisor.twin.incremental  # noqa: F401

        job = json.loads(args.fetch)
        seeds = [(Path(p), s) for p, s in job["seeds"]]
        print(json.dumps(asyncio.run(fetch(job["url"], Path(job["part"]), seeds, Path(job["package"])))))
        return 0
    results = run()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)
    print(f"\n{results['wall_s']:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
