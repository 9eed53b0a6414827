"""Builders of tiny models with the real families' signatures and known outputs.

Each builder writes one model file in milliseconds and returns its path. The detections a model
produces are fixed by its ``truth`` argument (``Truth`` rows: class id, score, box), so tests can
check decoded boxes, ids and scores numerically. The image input is wired into the graph (a
``mean(image) * 0`` term added to the outputs) so a feed of the wrong shape or type still fails.

- ONNX (``onnx.helper``): zoo tiny-YOLOv3-11 / YOLOv3-10 (with a real NonMaxSuppression node that
  removes planted duplicates), zoo SSD-MobileNet (uint8 NHWC, padding rows past the count),
  YOLOv8 / YOLOv5 raw heads (with planted duplicates and sub-threshold noise for NMS).
- Ultralytics exports (``metadata_props`` as their exporter writes them: ``ultralytics_metadata``):
  YOLOv8-style heads with static or dynamic input, end-to-end [1, 300, 6] (YOLOv10, YOLO26) and
  RT-DETR [1, 300, 4+C] outputs, and ``probe_onnx``, whose detections' scores are statistics of the
  input tensor (so preprocessing choices are observable in what comes out).
- TFLite (LiteRT flatbuffer object API): SSD with the real ``TFLite_Detection_PostProcess`` op,
  float or uint8-quantized input, outputs in op order or scrambled as TF2 converters leave them.
- Image classifiers (ONNX NCHW float; TFLite NHWC float, uint8 or int8 quantized in and out, as
  TF's quantized MobileNets): scores are a known function of the image's mean colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import flatbuffers
import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as tfl
from flatbuffers import flexbuffers
from onnx import TensorProto, helper, numpy_helper

# (class id, score, (xmin, ymin, xmax, ymax)); boxes normalised to the image unless a builder says
# otherwise (the YOLOv5/v8 heads take them in input pixels, as those models output them).
Truth = tuple[int, float, tuple[float, float, float, float]]

YOLOV3_TRUTH: tuple[Truth, ...] = (
    (0, 0.9, (0.10, 0.20, 0.45, 0.80)),
    (16, 0.8, (0.50, 0.30, 0.90, 0.70)),
    (2, 0.6, (0.50, 0.30, 0.90, 0.70)),  # same place, other class: NMS is per class
)
SSD_TRUTH: tuple[Truth, ...] = (
    (17, 0.9, (0.10, 0.20, 0.40, 0.60)),
    (3, 0.75, (0.50, 0.50, 0.90, 0.80)),
    (1, 0.4, (0.05, 0.60, 0.30, 0.95)),
)
# In input pixels of a 320x320 input.
YOLO_TRUTH: tuple[Truth, ...] = (
    (0, 0.92, (40.0, 60.0, 120.0, 200.0)),
    (2, 0.7, (150.0, 100.0, 300.0, 180.0)),
    (1, 0.55, (150.0, 100.0, 300.0, 180.0)),  # same place, other class
)

__all__ = [
    "PROBE_FEATURES",
    "SSD_TRUTH",
    "UINT8_INPUT_QUANT",
    "YOLOV3_TRUTH",
    "YOLO_TRUTH",
    "Truth",
    "classifier_onnx",
    "classifier_tflite",
    "classifier_weights",
    "end2end_onnx",
    "probe_onnx",
    "rtdetr_onnx",
    "ssd_mobilenet_onnx",
    "ssd_tflite",
    "tiny_yolov3_onnx",
    "ultralytics_metadata",
    "unrelated_onnx",
    "yolov3_10_onnx",
    "yolov5_onnx",
    "yolov8_onnx",
]

_F = TensorProto.FLOAT


def _save(graph: onnx.GraphProto, path: Path, opset: int, metadata: Mapping[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="modelgen")
    model.ir_version = 7  # old enough for any onnxruntime this project supports
    if metadata:
        helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _zero_of(image: str, nodes: list[onnx.NodeProto], cast: bool = False) -> str:
    """Append nodes computing mean(image) * 0 (a float scalar) and return its name."""
    src = image
    if cast:
        nodes.append(helper.make_node("Cast", [image], ["image_f"], to=_F))
        src = "image_f"
    nodes.append(helper.make_node("ReduceMean", [src], ["image_mean"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["image_mean", "zero"], ["image_zero"]))
    return "image_zero"


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _yolov3(path: Path, truth: Sequence[Truth], num_classes: int, size: int, zoo_11: bool) -> Path:
    # Candidates: each true box, a shifted lower-score duplicate NMS must remove, and a box below
    # the score threshold. Boxes are (y1, x1, y2, x2) normalised; the graph scales them by
    # image_shape, as the real model reports pixels of the original image.
    boxes, scores = [], np.zeros((num_classes, 3 * len(truth)), np.float32)
    for i, (cls, score, (x0, y0, x1, y1)) in enumerate(truth):
        boxes += [(y0, x0, y1, x1), (y0 + 0.01, x0 + 0.01, y1 + 0.01, x1 + 0.01), (y0, x0, y1, x1)]
        scores[cls, 3 * i : 3 * i + 3] = (score, score * 0.9, 0.0)
        scores[(cls + 1) % num_classes, 3 * i + 2] = 0.1  # under score_threshold 0.3
    names = (
        ("yolonms_layer_1", "yolonms_layer_1:1", "yolonms_layer_1:2")
        if zoo_11
        else ("yolonms_layer_1/ExpandDims_1:0", "yolonms_layer_1/ExpandDims_3:0", "yolonms_layer_1/concat_2:0")
    )
    nodes: list[onnx.NodeProto] = []
    zero = _zero_of("input_1", nodes)
    nodes += [
        helper.make_node("Concat", ["image_shape", "image_shape"], ["hwhw"], axis=1),
        helper.make_node("Mul", ["unit_boxes", "hwhw"], ["px_boxes"]),
        helper.make_node("Add", ["px_boxes", zero], [names[0]]),
        helper.make_node("Add", ["raw_scores", zero], [names[1]]),
        helper.make_node("NonMaxSuppression", [names[0], names[1], "max_boxes", "iou", "min_score"], ["selected"]),
        helper.make_node("Cast", ["selected"], ["selected_i32" if zoo_11 else names[2]], to=TensorProto.INT32),
    ]
    if zoo_11:
        nodes.append(helper.make_node("Unsqueeze", ["selected_i32"], [names[2]], axes=[0]))
    inits = [
        _const("zero", np.float32(0.0)),
        _const("unit_boxes", np.asarray(boxes, np.float32)[None]),
        _const("raw_scores", scores[None]),
        _const("max_boxes", np.array([20], np.int64)),
        _const("iou", np.array([0.5], np.float32)),
        _const("min_score", np.array([0.3], np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "yolov3",
        [
            helper.make_tensor_value_info("input_1", _F, ["N", 3, size, size]),
            helper.make_tensor_value_info("image_shape", _F, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info(names[0], _F, [1, "boxes", 4]),
            helper.make_tensor_value_info(names[1], _F, [1, num_classes, "boxes"]),
            helper.make_tensor_value_info(names[2], TensorProto.INT32, [1, "sel", 3] if zoo_11 else ["sel", 3]),
        ],
        inits,
    )
    return _save(graph, path, 11 if zoo_11 else 10)


def tiny_yolov3_onnx(path: Path, truth: Sequence[Truth] = YOLOV3_TRUTH, num_classes: int = 80, size: int = 416) -> Path:
    """Zoo tiny-yolov3-11 signature: indices [1,M,3], outputs named ``yolonms_layer_1[:k]``."""
    return _yolov3(path, truth, num_classes, size, zoo_11=True)


def yolov3_10_onnx(path: Path, truth: Sequence[Truth] = YOLOV3_TRUTH, num_classes: int = 80, size: int = 416) -> Path:
    """Zoo yolov3-10 signature: indices [M,3], outputs named ``yolonms_layer_1/...:0``."""
    return _yolov3(path, truth, num_classes, size, zoo_11=False)


def ssd_mobilenet_onnx(path: Path, truth: Sequence[Truth] = SSD_TRUTH, max_detections: int = 10) -> Path:
    """Zoo ssd_mobilenet_v1 signature: uint8 NHWC input of any size; ids kept as given.

    The rows past ``num_detections`` hold a confident-looking decoy that must be ignored."""
    rows = len(truth)
    boxes = np.zeros((1, max_detections, 4), np.float32)
    classes = np.zeros((1, max_detections), np.float32)
    scores = np.zeros((1, max_detections), np.float32)
    for i, (cls, score, (x0, y0, x1, y1)) in enumerate(truth):
        boxes[0, i], classes[0, i], scores[0, i] = (y0, x0, y1, x1), cls, score
    boxes[0, rows:], classes[0, rows:], scores[0, rows:] = (0.0, 0.0, 1.0, 1.0), 5.0, 0.99
    nodes: list[onnx.NodeProto] = []
    zero = _zero_of("image_tensor:0", nodes, cast=True)
    outs = ("detection_boxes:0", "detection_classes:0", "detection_scores:0", "num_detections:0")
    consts = (boxes, classes, scores, np.array([rows], np.float32))
    nodes += [helper.make_node("Add", [f"c_{o}", zero], [o]) for o in outs]
    graph = helper.make_graph(
        nodes,
        "ssd_mobilenet_v1",
        [helper.make_tensor_value_info("image_tensor:0", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(o, _F, ["N", *c.shape[1:]]) for o, c in zip(outs, consts, strict=True)],
        [_const("zero", np.float32(0.0))] + [_const(f"c_{o}", c) for o, c in zip(outs, consts, strict=True)],
    )
    return _save(graph, path, 13)


def _yolo_rows(truth: Sequence[Truth], num_classes: int, count: int) -> np.ndarray:
    """[count, 4 + C] rows of (cx, cy, w, h, class scores): the truth, a shifted duplicate of each
    at 0.9x the score (NMS must drop it), a runner-up class per box, and empty rows."""
    rows = np.zeros((count, 4 + num_classes), np.float32)
    for i, (cls, score, (x0, y0, x1, y1)) in enumerate(truth):
        box = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
        rows[2 * i, :4] = box
        rows[2 * i + 1, :4] = (box[0] + 3, box[1] + 2, box[2], box[3])
        rows[2 * i, 4 + cls], rows[2 * i + 1, 4 + cls] = score, score * 0.9
        rows[2 * i, 4 + (cls + 1) % num_classes] = score / 4
    return rows


def _yolo_graph(
    path: Path, name: str, head: np.ndarray, size: int, *, dynamic: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """One image input (``dynamic``: height and width named, as ``export(dynamic=True)`` leaves
    them; the output's long axis too) and one output: the constant ``head``."""
    nodes: list[onnx.NodeProto] = []
    zero = _zero_of("images", nodes)
    nodes.append(helper.make_node("Add", ["head", zero], ["output0"]))
    image_shape: list[int | str] = [1, 3, "height", "width"] if dynamic else [1, 3, size, size]
    out_shape: list[int | str] = list(head.shape)
    if dynamic and head.shape[1] < head.shape[2]:
        out_shape[2] = "anchors"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", _F, image_shape)],
        [helper.make_tensor_value_info("output0", _F, out_shape)],
        [_const("zero", np.float32(0.0)), _const("head", head)],
    )
    return _save(graph, path, 13, metadata)


def ultralytics_metadata(
    names: Sequence[str] | None = ("person", "bicycle", "car"),
    imgsz: tuple[int, int] | None = (320, 320),
    task: str | None = "detect",
    stride: int | None = 32,
    description: str = "Ultralytics YOLO11n model trained on coco.yaml",
) -> dict[str, str]:
    """``metadata_props`` as Ultralytics' exporter writes them: every value ``str()`` of a Python
    object (names a dict literal, imgsz a list of height and width)."""
    props = {
        "description": description,
        "author": "Ultralytics",
        "date": "2025-01-01T00:00:00",
        "version": "8.3.40",
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": None if stride is None else str(stride),
        "task": task,
        "batch": "1",
        "imgsz": None if imgsz is None else str(list(imgsz)),
        "names": None if names is None else str(dict(enumerate(names))),
        "args": str({"batch": 1, "half": False, "dynamic": False, "nms": False}),
        "channels": "3",
    }
    return {k: v for k, v in props.items() if v is not None}


def yolov8_onnx(
    path: Path, truth: Sequence[Truth] = YOLO_TRUTH, num_classes: int = 3, size: int = 320, anchors: int = 64,
    *, dynamic: bool = False, metadata: Mapping[str, str] | None = None,
) -> Path:
    """YOLOv8 export: output [1, 4+C, N] (cx, cy, w, h, class scores) in input pixels."""
    head = _yolo_rows(truth, num_classes, anchors).T[None].copy()
    return _yolo_graph(path, "yolov8", head, size, dynamic=dynamic, metadata=metadata)


def end2end_onnx(
    path: Path, rows: Sequence[tuple[float, float, float, float, float, int]], size: int = 320, count: int = 300,
    *, dynamic: bool = False, metadata: Mapping[str, str] | None = None,
) -> Path:
    """YOLOv10 / YOLO26 end-to-end export: output [1, count, 6], rows (x1, y1, x2, y2, score, class)
    in input pixels, best first, the rest zero (as the model pads its top-k)."""
    head = np.zeros((1, count, 6), np.float32)
    head[0, : len(rows)] = np.asarray(rows, np.float32).reshape(-1, 6)
    return _yolo_graph(path, "yolo_end2end", head, size, dynamic=dynamic, metadata=metadata)


def rtdetr_onnx(
    path: Path, truth: Sequence[Truth], num_classes: int, size: int = 320, count: int = 300,
    *, metadata: Mapping[str, str] | None = None,
) -> Path:
    """RT-DETR export: output [1, count, 4+C], cx, cy, w, h normalised to the input, then C class
    scores (already sigmoid); ``truth`` boxes are normalised xyxy. Each query also scores 0.02 for
    another class, under the default cut-off."""
    head = np.zeros((1, count, 4 + num_classes), np.float32)
    for i, (cls, score, (x0, y0, x1, y1)) in enumerate(truth):
        head[0, i, :4] = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
        head[0, i, 4 + cls] = score
        head[0, i, 4 + (cls + 1) % num_classes] = 0.02
    return _yolo_graph(path, "rtdetr", head, size, metadata=metadata)


# The statistics probe_onnx reports, by class id.
PROBE_FEATURES = ("mean0", "mean1", "mean2", "top0", "left0")


def probe_onnx(path: Path, size: int = 64, layout: str = "NCHW", anchors: int = 16) -> Path:
    """A v8-style head whose class k scores, on anchor k only, a statistic of the input tensor
    (``PROBE_FEATURES``): the mean of each channel as fed (0, 1, 2), and the mean of channel 0 over
    the top half (3) and the left half (4) of the input. Every anchor's box is the centre quarter
    of the input, so each statistic comes back as the score of the detection of its class."""
    k = len(PROBE_FEATURES)
    nchw = layout == "NCHW"
    spatial = [2, 3] if nchw else [1, 2]
    channel = 1 if nchw else 3
    half = size // 2
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["channel_means"], axes=spatial, keepdims=0),
        helper.make_node("Slice", ["images", "zero2", "top_end", "top_axes"], ["top"]),
        helper.make_node("ReduceMean", ["top"], ["top_mean"], keepdims=0),
        helper.make_node("Slice", ["images", "zero2", "top_end", "left_axes"], ["left"]),
        helper.make_node("ReduceMean", ["left"], ["left_mean"], keepdims=0),
        helper.make_node("Reshape", ["top_mean", "one_by_one"], ["top_2d"]),
        helper.make_node("Reshape", ["left_mean", "one_by_one"], ["left_2d"]),
        helper.make_node("Concat", ["channel_means", "top_2d", "left_2d"], ["features"], axis=1),
        helper.make_node("Unsqueeze", ["features", "axis2"], ["features_3d"]),
        helper.make_node("Mul", ["features_3d", "mask"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1),
    ]
    boxes = np.zeros((1, 4, anchors), np.float32)
    boxes[0, :, :k] = np.array([size / 2, size / 2, size / 2, size / 2], np.float32)[:, None]
    mask = np.zeros((1, k, anchors), np.float32)
    mask[0, np.arange(k), np.arange(k)] = 1.0
    inits = [
        _const("zero2", np.array([0, 0], np.int64)),
        _const("top_end", np.array([1, half], np.int64)),  # channel 0 only, the first half of an axis
        _const("top_axes", np.array([channel, 2 if nchw else 1], np.int64)),
        _const("left_axes", np.array([channel, 3 if nchw else 2], np.int64)),
        _const("one_by_one", np.array([1, 1], np.int64)),
        _const("axis2", np.array([2], np.int64)),
        _const("mask", mask),
        _const("boxes", boxes),
    ]
    shape = [1, 3, size, size] if nchw else [1, size, size, 3]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("images", _F, shape)],
        [helper.make_tensor_value_info("output0", _F, [1, 4 + k, anchors])],
        inits,
    )
    return _save(graph, path, 13)


def yolov5_onnx(
    path: Path, truth: Sequence[Truth] = YOLO_TRUTH, num_classes: int = 3, size: int = 320, anchors: int = 64
) -> Path:
    """YOLOv5 export: output [1, N, 5+C] (cx, cy, w, h, objectness, class scores), score = obj * cls.

    Objectness is 0.95 on real boxes; one extra row has a high class score but objectness 0.06,
    so its score (0.03) falls under the default cut-off only if the product is taken."""
    rows = _yolo_rows(truth, num_classes, anchors)
    obj = np.where(rows[:, 4:].max(axis=1) > 0, 0.95, 0.0).astype(np.float32)
    head = np.concatenate((rows[:, :4], obj[:, None], rows[:, 4:] / 0.95), axis=1)
    head[-1, :6] = (160.0, 160.0, 50.0, 50.0, 0.06, 0.5)
    return _yolo_graph(path, "yolov5", head[None].copy(), size)


def unrelated_onnx(path: Path) -> Path:
    """An image-to-image model: image [1,3,32,32] -> enhanced [1,3,32,32]; no family fits it."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["data", "gain"], ["enhanced"])],
        "enhancer",
        [helper.make_tensor_value_info("data", _F, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("enhanced", _F, [1, 3, 32, 32])],
        [_const("gain", np.float32(2.0))],
    )
    return _save(graph, path, 13)


def classifier_weights(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W [C, 3], b [C]) of the generated classifiers: logits = mean(tensor per channel) @ W.T + b.

    Class c's weights point at a colour, so that uniform images of different colours win different
    classes; fixed by a seed so tests can compute the expected answer."""
    rng = np.random.default_rng(12)
    return rng.normal(0.0, 3.0, (num_classes, 3)).astype(np.float32), rng.normal(0.0, 0.5, num_classes).astype(
        np.float32)


def classifier_onnx(path: Path, num_classes: int = 1000, size: int = 224, softmax: bool = False,
                    dynamic: bool = False) -> Path:
    """An ONNX image classifier (NCHW float input, as the ONNX model zoo's ResNet and MobileNet):
    scores [1, C] = (softmax of) mean per channel @ W.T + b, see ``classifier_weights``."""
    w, b = classifier_weights(num_classes)
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits" if softmax else "scores"], transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    side: Sequence[int | str] = ("H", "W") if dynamic else (size, size)
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("data", _F, [1, 3, *side])],
        [helper.make_tensor_value_info("scores", _F, [1, num_classes])],
        [_const("w", w), _const("b", b)],
    )
    return _save(graph, path, 13)


# --- TFLite ------------------------------------------------------------------------------------

UINT8_INPUT_QUANT = (0.0078125, 128)  # what TF's quantized SSDs use: raw pixels map onto [-1, 1]


class _TfliteGraph:
    """Tensors and buffers of one TFLite subgraph under construction."""

    def __init__(self) -> None:
        self.buffers = [tfl.BufferT()]  # buffer 0: the empty buffer of non-constant tensors
        self.tensors: list[tfl.TensorT] = []

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        ttype: int = tfl.TensorType.FLOAT32,
        data: np.ndarray | None = None,
        quant: tuple[float, int] | None = None,
    ) -> int:
        buf = 0
        if data is not None:
            raw = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(tfl.BufferT(data=raw))
            buf = len(self.buffers) - 1
        q = tfl.QuantizationParametersT(scale=[quant[0]], zeroPoint=[quant[1]]) if quant else None
        self.tensors.append(tfl.TensorT(shape=list(shape), type=ttype, buffer=buf, name=name, quantization=q))
        return len(self.tensors) - 1


def ssd_tflite(
    path: Path,
    truth: Sequence[Truth] = SSD_TRUTH,
    *,
    quantized: bool = False,
    scrambled: bool = False,
    size: int = 300,
    num_classes: int = 90,
    max_detections: int = 10,
) -> Path:
    """SSD ending in TFLite_Detection_PostProcess (class ids 0-based, background column added).

    Anchors are the true boxes and the box encodings are zero, so the op decodes exactly the
    truth. ``quantized`` gives a uint8 input (scale 1/128, zero point 128); ``scrambled`` lists
    the outputs as (scores, boxes, count, classes) named ``StatefulPartitionedCall:k``."""
    g = _TfliteGraph()
    n = len(truth)
    anchors = np.array([((y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0) for _, _, (x0, y0, x1, y1) in truth])
    class_scores = np.zeros((1, n, num_classes + 1), np.float32)
    for i, (cls, score, _) in enumerate(truth):
        class_scores[0, i, cls + 1] = score
    shape = (1, size, size, 3)
    if quantized:
        image = g.tensor("normalized_input_image_tensor", shape, tfl.TensorType.UINT8, quant=UINT8_INPUT_QUANT)
        real = g.tensor("image_float", shape)
    else:
        image = real = g.tensor("normalized_input_image_tensor", shape)
    axes = g.tensor("axes", (3,), tfl.TensorType.INT32, np.array([1, 2, 3], np.int32))
    mean, zeroed = g.tensor("mean", (1,)), g.tensor("zeroed", (1,))
    zero = g.tensor("zero", (1,), data=np.zeros(1, np.float32))
    enc_const = g.tensor("box_enc_const", (1, n, 4), data=np.zeros((1, n, 4), np.float32))
    enc = g.tensor("raw_outputs/box_encodings", (1, n, 4))
    scores_in = g.tensor("raw_outputs/class_predictions", (1, n, num_classes + 1), data=class_scores)
    anc = g.tensor("anchors", (n, 4), data=anchors.astype(np.float32))
    op_name = "TFLite_Detection_PostProcess"
    shapes = ((1, max_detections, 4), (1, max_detections), (1, max_detections), (1,))
    outs = [g.tensor(op_name + (f":{k}" if k else ""), s) for k, s in enumerate(shapes)]
    order = outs
    if scrambled:
        order = [outs[2], outs[0], outs[3], outs[1]]
        for k, index in enumerate(order):
            g.tensors[index].name = f"StatefulPartitionedCall:{k}"
    options = flexbuffers.Dumps(
        dict(max_detections=max_detections, max_classes_per_detection=1, detections_per_class=100,
             use_regular_nms=False, nms_score_threshold=0.01, nms_iou_threshold=0.6, num_classes=num_classes,
             y_scale=10.0, x_scale=10.0, h_scale=5.0, w_scale=5.0)
    )  # fmt: skip
    op = tfl.BuiltinOperator
    codes = [(op.DEQUANTIZE, None), (op.MEAN, None), (op.MUL, None), (op.ADD, None), (op.CUSTOM, op_name)]
    kinds = tfl.BuiltinOptions
    ops = [
        tfl.OperatorT(1, [real, axes], [mean], kinds.ReducerOptions, tfl.ReducerOptionsT(keepDims=False)),
        tfl.OperatorT(2, [mean, zero], [zeroed], kinds.MulOptions, tfl.MulOptionsT()),
        tfl.OperatorT(3, [enc_const, zeroed], [enc], kinds.AddOptions, tfl.AddOptionsT()),
        tfl.OperatorT(4, [enc, scores_in, anc], outs, customOptions=np.frombuffer(bytes(options), np.uint8)),
    ]
    if quantized:
        ops.insert(0, tfl.OperatorT(0, [image], [real]))
    model = tfl.ModelT(
        version=3,
        operatorCodes=[tfl.OperatorCodeT(deprecatedBuiltinCode=c, customCode=name, builtinCode=c) for c, name in codes],
        subgraphs=[tfl.SubGraphT(tensors=g.tensors, inputs=[image], outputs=order, operators=ops, name="main")],
        buffers=g.buffers,
        description="modelgen ssd",
    )
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


# (input scale, zero point) of the quantized classifiers: raw pixels map onto [-1, 1]; outputs are
# probabilities in steps of 1/256, as TF's quantized MobileNets have them.
CLASSIFIER_INPUT_QUANT = {"uint8": (0.0078125, 128), "int8": (0.0078125, 0)}
CLASSIFIER_OUTPUT_QUANT = {"uint8": (1 / 256, 0), "int8": (1 / 256, -128)}


def classifier_tflite(path: Path, num_classes: int = 1001, size: int = 224, quantized: str | None = None) -> Path:
    """A TFLite image classifier (NHWC, softmax inside, as TF's MobileNets): probabilities [1, C] =
    softmax(mean per channel of the [-1, 1] tensor @ W.T + b), see ``classifier_weights``.
    ``quantized`` ("uint8" or "int8"): quantized input (raw pixels) and output (1/256 steps)."""
    g = _TfliteGraph()
    w, b = classifier_weights(num_classes)
    ttypes = {"uint8": tfl.TensorType.UINT8, "int8": tfl.TensorType.INT8}
    shape = (1, size, size, 3)
    if quantized:
        image = g.tensor("input", shape, ttypes[quantized], quant=CLASSIFIER_INPUT_QUANT[quantized])
        real = g.tensor("input_float", shape)
    else:
        image = real = g.tensor("input", shape)
    axes = g.tensor("axes", (2,), tfl.TensorType.INT32, np.array([1, 2], np.int32))
    pooled = g.tensor("pooled", (1, 3))
    weights = g.tensor("weights", (num_classes, 3), data=w)
    bias = g.tensor("bias", (num_classes,), data=b)
    logits = g.tensor("logits", (1, num_classes))
    probs = g.tensor("probabilities" if not quantized else "probabilities_float", (1, num_classes))
    op = tfl.BuiltinOperator
    codes = [op.DEQUANTIZE, op.MEAN, op.FULLY_CONNECTED, op.SOFTMAX, op.QUANTIZE]
    kinds = tfl.BuiltinOptions
    ops = [
        tfl.OperatorT(1, [real, axes], [pooled], kinds.ReducerOptions, tfl.ReducerOptionsT(keepDims=False)),
        tfl.OperatorT(2, [pooled, weights, bias], [logits], kinds.FullyConnectedOptions,
                      tfl.FullyConnectedOptionsT()),
        tfl.OperatorT(3, [logits], [probs], kinds.SoftmaxOptions, tfl.SoftmaxOptionsT(beta=1.0)),
    ]
    output = probs
    if quantized:
        ops.insert(0, tfl.OperatorT(0, [image], [real]))
        output = g.tensor("probabilities", (1, num_classes), ttypes[quantized],
                          quant=CLASSIFIER_OUTPUT_QUANT[quantized])
        ops.append(tfl.OperatorT(4, [probs], [output]))
    model = tfl.ModelT(
        version=3,
        operatorCodes=[tfl.OperatorCodeT(deprecatedBuiltinCode=c, builtinCode=c) for c in codes],
        subgraphs=[tfl.SubGraphT(tensors=g.tensors, inputs=[image], outputs=[output], operators=ops, name="main")],
        buffers=g.buffers,
        description="modelgen classifier",
    )
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path
