"""Model packages for tests: valid ones (tiny ONNX SSD models, the bundled BlazeFace) and a corpus
of bad ones, each with the words its rejection reason must contain.

The ONNX models are real models built with ``onnx.helper``, small enough to load in milliseconds:

- ``ssd_onnx``: the shape of the ONNX-zoo SSD (uint8 NHWC in; boxes, classes, scores, count out),
  served by the ``onnx_ssd`` handler. It reports one box whose score is the image's mean
  brightness, so every real photo gives one detection.
- ``ssd_onnx(fail_on_real_images=True)``: the same, except that a Reshape's target shape grows by
  one row as soon as the image is not uniform. The blank warm-up image passes; every real image
  makes onnxruntime fail (the kind of model only real traffic can unmask: auto-rollback).
- ``ssd_onnx(fail_at_warmup=True)``: the same signature, so it loads and a handler takes it, but the
  box row is picked with index 7 + 0 * brightness: onnxruntime fails on every image, the blank warm-up
  image included (an index computed from the input cannot be checked, or folded, at load time).
- ``no_handler_onnx``: an image-to-image model (one [1, 3, 32, 32] output): no family fits it.
- ``pose_onnx``: an Ultralytics pose export ([1, 56, N] head, task 'pose' in its metadata): it would
  decode as 52 classes of boxes, so its metadata's task refuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import onnx
from onnx import TensorProto, helper

from supervisor.updates.events import EventBus, ModelEvent

__all__ = [
    "BAD_PACKAGES",
    "BUNDLED",
    "BUNDLED_TFLITE",
    "FULL_RANGE_TFLITE",
    "bad_package",
    "big_ssd_onnx",
    "blazeface_files",
    "last",
    "no_handler_onnx",
    "package_files",
    "pose_onnx",
    "ssd_files",
    "ssd_onnx",
    "states",
    "write_folder",
    "write_zip",
    "zip_bytes",
]

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "supervisor" / "bundled" / "blazeface-short-range"
BUNDLED_TFLITE = BUNDLED / "face_detection_short_range.tflite"
FULL_RANGE_TFLITE = ROOT / "tests" / "data" / "face_detection_full_range.tflite"
SSD_LABELS = "background\nthing\n"
_SIZE = 64  # input height and width of the test SSD models
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- events ------------------------------------------------------------------------------------------


def states(events: EventBus, package: str | None = None) -> list[str]:
    """The states published so far (for one package, if given), oldest first."""
    return [e.state for e in events.history if package is None or e.package == package]


def last(events: EventBus, state: str) -> ModelEvent | None:
    """The latest event in ``state``, if any."""
    return next((e for e in reversed(events.history) if e.state == state), None)


# -- models ------------------------------------------------------------------------------------------


@cache
def ssd_onnx(fail_on_real_images: bool = False, box: tuple[float, float, float, float] = (0.1, 0.2, 0.5, 0.6),
             fail_at_warmup: bool = False) -> bytes:
    """A tiny SSD-shaped ONNX model (see the module docstring). ``box`` is (ymin, xmin, ymax, xmax)."""
    n = 1
    nodes = [
        helper.make_node("Cast", ["image_tensor:0"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], keepdims=0),
        helper.make_node("Div", ["mean", "c255"], ["brightness"]),
        helper.make_node("Reshape", ["brightness", "shape_scores"], ["detection_scores"]),
        helper.make_node("Identity", ["classes_c"], ["detection_classes"]),
        helper.make_node("Identity", ["count_c"], ["num_detections"]),
    ]
    inits = [
        helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("shape_scores", TensorProto.INT64, [2], [1, n]),
        helper.make_tensor("classes_c", TensorProto.FLOAT, [1, n], [1.0]),
        helper.make_tensor("count_c", TensorProto.FLOAT, [1], [float(n)]),
        helper.make_tensor("boxes_flat", TensorProto.FLOAT, [4 * n], list(box)),
    ]
    if fail_on_real_images or fail_at_warmup:
        # The box row is picked with index 7 * min(max - min, 1): row 0 for a uniform image, row 7
        # (there is none: onnxruntime fails) for anything else. fail_at_warmup: 7 + 0 * brightness,
        # row 7 whatever the image.
        picks = [
            helper.make_node("Mul", ["brightness", "c0"], ["nothing"]),
            helper.make_node("Add", ["nothing", "c7"], ["row_f"]),
        ] if fail_at_warmup else [
            helper.make_node("ReduceMax", ["pixels"], ["hi"], keepdims=0),
            helper.make_node("ReduceMin", ["pixels"], ["lo"], keepdims=0),
            helper.make_node("Sub", ["hi", "lo"], ["spread"]),
            helper.make_node("Min", ["spread", "c1"], ["nonuniform"]),
            helper.make_node("Mul", ["nonuniform", "c7"], ["row_f"]),
        ]
        nodes += [
            *picks,
            helper.make_node("Cast", ["row_f"], ["row"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["row", "shape_1"], ["rows"]),
            helper.make_node("Reshape", ["boxes_flat", "shape_boxes"], ["boxes"]),
            helper.make_node("Gather", ["boxes", "rows"], ["detection_boxes"], axis=1),
        ]
        inits += [
            helper.make_tensor("c0", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("c1", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("c7", TensorProto.FLOAT, [], [7.0]),
            helper.make_tensor("shape_1", TensorProto.INT64, [1], [1]),
        ]
    else:
        nodes.append(helper.make_node("Reshape", ["boxes_flat", "shape_boxes"], ["detection_boxes"]))
    inits.append(helper.make_tensor("shape_boxes", TensorProto.INT64, [3], [1, n, 4]))
    graph = helper.make_graph(
        nodes,
        "tiny_ssd",
        [helper.make_tensor_value_info("image_tensor:0", TensorProto.UINT8, [1, _SIZE, _SIZE, 3])],
        [
            helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, [1, n, 4]),
            helper.make_tensor_value_info("detection_classes", TensorProto.FLOAT, [1, n]),
            helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, [1, n]),
            helper.make_tensor_value_info("num_detections", TensorProto.FLOAT, [1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeloader-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@cache
def big_ssd_onnx(weights: int = 1_500_000) -> bytes:
    """The tiny SSD carrying ``weights`` float32 weights (6 MB for the default) that inference really
    reads: they scale with the image's brightness and their sum (times zero) is added to the score, so
    no optimisation folds them away. Large enough for the ONNX optimised-model cache (ort_cache.py:
    1 MiB), which then holds them in its external-data file."""
    model = onnx.load_from_string(ssd_onnx())
    graph = model.graph
    rng = np.random.default_rng(weights)
    graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal(weights).astype(np.float32), "big_weights"),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ])
    scores = next(n for n in graph.node if n.output[0] == "detection_scores")
    scores.input[0] = "brightness_plus"
    graph.node.extend([
        helper.make_node("Mul", ["big_weights", "brightness"], ["scaled_weights"]),
        helper.make_node("ReduceSum", ["scaled_weights"], ["weights_sum"], keepdims=0),
        helper.make_node("Mul", ["weights_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["brightness", "nothing"], ["brightness_plus"]),
    ])
    sorted_nodes = onnx.helper.make_graph(
        _topological(list(graph.node), [i.name for i in graph.input], [t.name for t in graph.initializer]),
        graph.name, graph.input, graph.output, graph.initializer)
    big = helper.make_model(sorted_nodes, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeloader-tests")
    big.ir_version = 8
    onnx.checker.check_model(big)
    return big.SerializeToString()


def _topological(nodes: list[onnx.NodeProto], inputs: list[str], inits: list[str]) -> list[onnx.NodeProto]:
    ready, ordered, pending = set(inputs) | set(inits), [], list(nodes)
    while pending:
        node = next(n for n in pending if all(i in ready for i in n.input))
        pending.remove(node)
        ordered.append(node)
        ready.update(node.output)
    return ordered


@cache
def no_handler_onnx() -> bytes:
    """An image-to-image model (float NCHW in, a [1, 3, 32, 32] map out): no family fits it."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "two"], ["enhanced"])],
        "enhancer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@cache
def pose_onnx() -> bytes:
    """An Ultralytics YOLOv8-pose export's shape: [1, 4 + 1 + 17 * 3, N], task 'pose'."""
    with tempfile.TemporaryDirectory() as tmp:
        meta = modelgen.ultralytics_metadata(names=("person",), task="pose")
        return modelgen.yolov8_onnx(Path(tmp) / "pose.onnx", (), num_classes=52, metadata=meta).read_bytes()


# -- valid packages ------------------------------------------------------------------------------------


def package_files(
    name: str,
    version: str,
    model_file: str,
    model: bytes,
    labels: str | None,
    *,
    hashes: bool = True,
    extra_files: dict[str, bytes] | None = None,
    **manifest: Any,
) -> dict[str, bytes]:
    """The files of a package (path -> bytes), with a model.json listing each file's SHA-256."""
    files = {model_file: model, **(extra_files or {})}
    if labels is not None:
        files["labels.txt"] = labels.encode()
    meta: dict[str, Any] = {"name": name, "version": version, "model": model_file, **manifest}
    if labels is not None:
        meta["labels"] = "labels.txt"
    if hashes:
        meta["files"] = {path: _sha(data) for path, data in files.items()}
    return {"model.json": json.dumps(meta, indent=2).encode(), **files}


def ssd_files(name: str = "tiny-ssd", version: str = "1", *, fail_on_real_images: bool = False,
              fail_at_warmup: bool = False, extra_files: dict[str, bytes] | None = None, big: bool = False,
              **manifest: Any) -> dict[str, bytes]:
    """``big``: the model with 6 MB of weights of its own (``big_ssd_onnx``)."""
    model = big_ssd_onnx() if big else ssd_onnx(fail_on_real_images, fail_at_warmup=fail_at_warmup)
    manifest = {"handler": "onnx_ssd", "score_threshold": 0.1, **manifest}  # scores are ~brightness
    return package_files(name, version, "model.onnx", model, SSD_LABELS, extra_files=extra_files, **manifest)


def blazeface_files(name: str = "faces", version: str = "1", *, model: Path = BUNDLED_TFLITE,
                    **manifest: Any) -> dict[str, bytes]:
    """The bundled BlazeFace (or the full-range one) under another name and version."""
    return package_files(name, version, model.name, model.read_bytes(), "face\n", handler="blazeface", **manifest)


def zip_bytes(files: dict[str, bytes], folder: str | None = None) -> bytes:
    """A zip of ``files`` (optionally all under one top folder, as zipping a folder gives)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            # A fixed timestamp: the same files give the same bytes (the same package SHA-256).
            zf.writestr(zipfile.ZipInfo(f"{folder}/{path}" if folder else path, _ZIP_DATE), data,
                        zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(files))
    return path


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


# -- bad packages -----------------------------------------------------------------------------------


def _zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]], base: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in [*(base or {}).items(), *entries]:
            if isinstance(info, str):
                info = zipfile.ZipInfo(info, _ZIP_DATE)
            zf.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("labels.txt")
    info.external_attr = 0o120777 << 16  # S_IFLNK: what `zip --symlinks` stores
    return info


@cache
def _zip_bomb() -> bytes:
    # 30 MB of zeros deflate to ~30 kB: a ratio of ~1000:1.
    return _zip_with([("padding.bin", bytes(30_000_000))], ssd_files("bomb", "1", hashes=False))


def _bad_checksum_files() -> dict[str, bytes]:
    files = ssd_files("badsum", "1")
    meta = json.loads(files["model.json"])
    meta["files"]["labels.txt"] = "0" * 64
    return {**files, "model.json": json.dumps(meta).encode()}


def _pose_files() -> dict[str, bytes]:
    return package_files("pose", "1", "model.onnx", pose_onnx(), None)


# name -> (file name in the drop folder, bytes, sidecars {suffix: text}, words the reason must hold)
BAD_PACKAGES: dict[str, tuple[str, Any, dict[str, str], tuple[str, ...]]] = {
    "zip-slip": ("slip.zip", lambda: _zip_with([("../evil.txt", b"x")], ssd_files("slip")),
                 {}, ("unsafe path", "leaves the package")),
    "absolute-path": ("absolute.zip", lambda: _zip_with([("/etc/evil.txt", b"x")], ssd_files("abs")),
                      {}, ("unsafe path", "absolute")),
    "symlink-entry": ("symlink.zip", lambda: _zip_with([(_symlink_entry(), b"/etc/passwd")],
                                                       {"model.onnx": ssd_onnx()}), {}, ("symlink",)),
    "zip-bomb": ("bomb.zip", _zip_bomb, {}, ("zip bomb",)),
    "truncated-zip": ("truncated.zip", lambda: zip_bytes(ssd_files("trunc"))[:-200], {}, ("not a valid zip",)),
    "manifest-checksum": ("badsum.zip", lambda: zip_bytes(_bad_checksum_files()), {},
                          ("checksum mismatch", "labels.txt")),
    "sidecar-sha256": ("sidecar.zip", lambda: zip_bytes(ssd_files("sidecar")), {".sha256": "ab" * 32 + "  x\n"},
                       ("package SHA-256",)),
    "sidecar-md5": ("md5.zip", lambda: zip_bytes(ssd_files("md5")), {".md5": "0" * 32 + "\n"}, ("package MD5",)),
    "garbage-model": ("garbage.zip", lambda: zip_bytes(package_files(
        "garbage", "1", "model.onnx", np.random.default_rng(7).bytes(4096), SSD_LABELS)),
        {}, ("cannot load", "model.onnx")),
    "no-handler": ("enhancer.zip", lambda: zip_bytes(package_files(
        "enhancer", "1", "model.onnx", no_handler_onnx(), "a\nb\n")), {}, ("no handler matches",)),
    "ultralytics-pose": ("pose.zip", lambda: zip_bytes(_pose_files()), {},
                         ("task 'pose'", "detection and classification models")),
    "not-a-zip": ("notes.zip", lambda: b"These are my notes, not a model.\n" * 20, {}, ("not a valid zip",)),
    "empty-file": ("empty.zip", lambda: b"", {}, ("empty",)),
}


def bad_package(kind: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """Write bad package ``kind`` (and its sidecars) into ``folder``; returns it and the reason words.
    Sidecars are written first, as a sender would, so the package is never seen without them."""
    file_name, make, extras, words = BAD_PACKAGES[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    for suffix, text in extras.items():
        path.with_name(path.name + suffix).write_text(text)
    path.write_bytes(make())
    return path, words
