"""Ultralytics-style ONNX exports: YOLOv5, v5u, v8, v9, v10, 11, YOLO26 and RT-DETR.

One image input (float, RGB /255, letterboxed centred on gray 114 as Ultralytics does; RT-DETR
stretched) and one output in one of four layouts:

- ``v8``: [1, 4+C, N]: cx, cy, w, h in input pixels, then C class scores (YOLOv5u, v8, v9, 11, a
  YOLO26 exported without end2end). NMS here.
- ``v5``: [1, N, 5+C]: cx, cy, w, h, objectness, then C class scores, score = objectness * class
  (the YOLOv5 repository's exports). NMS here.
- ``end2end``: [1, K, 6]: x1, y1, x2, y2, score, class id in input pixels (YOLOv10, YOLO26, any
  export made with nms=True). Already one box per object: no NMS.
- ``rtdetr``: [1, K, 4+C]: cx, cy, w, h normalised to the input, then C class scores already
  through a sigmoid. No NMS; trained on stretched images, so stretched by default.

The ``output_layout`` option names one; otherwise the output's shape and the model's metadata tell:
[4+C, N] with 4+C < N is v8. [N, K] with K < N is v5 for exports that state no task (the YOLOv5
repository writes only names and stride); for Ultralytics exports (they state a task) it is end2end
when K is 6 and rtdetr otherwise, and rtdetr whenever the metadata's description names an RT-DETR
(a two-class RT-DETR also has rows of 6).

From the metadata (handlers/metadata.py) come the input size of a dynamic-input export (``imgsz``:
a model exported at 320 is fed 320, not 640), the class names (the loader uses them when the package
has no labels file) and the stride a chosen ``input_size`` must be a multiple of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from handlers.base import Detection, Handler, HandlerMismatch, Prepared, Signature, register
from handlers.boxes import cxcywh_to_xyxy, nms, nms_per_class, to_detections
from handlers.imaging import Letterbox, PixelScale
from handlers.metadata import ModelMetadata
from handlers.options import HandlerOptions, ResizeOptions
from handlers.preprocess import PlannedInput, input_layout, input_size, preprocess_plan

__all__ = ["Head", "Yolo", "YoloOptions", "head_of"]

_SCALE = PixelScale.to_range(0.0, 1.0)
_FILL = 114
# Boxes kept for NMS at most (ultralytics uses 30000; past a few thousand it is all noise).
_MAX_CANDIDATES = 4096

Head = Literal["v5", "v8", "end2end", "rtdetr"]
NmsMode = Literal["per-class", "agnostic", "none"]


def head_of(d1: int | None, d2: int | None, metadata: ModelMetadata) -> Head | None:
    """The output layout of an output [1, d1, d2]; None when the dims do not say (dynamic, square)."""
    if d1 is not None and d2 is None and metadata.names and d1 == 4 + len(metadata.names):
        return "v8"  # a dynamic=True export: [1, 4+C, anchors], C told by the names
    if d1 is None or d2 is None or d1 == d2:
        return None
    if d1 < d2:
        return "v8"
    if not metadata.ultralytics:
        return "v5"
    if metadata.rtdetr:
        return "rtdetr"
    return "end2end" if d2 == 6 else "rtdetr"


def _num_classes(head: Head | None, d1: int | None, d2: int | None, metadata: ModelMetadata) -> int | None:
    if head == "v8" and d1:
        return d1 - 4
    if head == "v5" and d2:
        return d2 - 5
    if head == "rtdetr" and d2:
        return d2 - 4
    if head == "end2end" and metadata.names:
        return len(metadata.names)
    return None


class YoloOptions(ResizeOptions):
    """handler_options of ``yolo``."""

    iou_threshold: float = Field(0.45, ge=0.0, le=1.0, strict=True)
    """Boxes overlapping more than this (intersection over union) are merged by NMS."""
    output_layout: Head | None = None
    """Output layout when its shape and the metadata do not tell: "v8" ([1,4+C,N]), "v5" ([1,N,5+C]),
    "end2end" ([1,K,6]: x1, y1, x2, y2, score, class) or "rtdetr" ([1,K,4+C], normalised)."""
    nms: NmsMode | None = None
    """"per-class" (boxes of different classes never suppress each other), "agnostic" (the best box
    at a place wins whatever its class) or "none". Default: per-class for v5/v8, none for end2end and
    rtdetr outputs (their models keep one box per object themselves)."""

    @model_validator(mode="before")
    @classmethod
    def _older_layout_name(cls, data: Any) -> Any:
        # ``layout`` named the output layout ("v5"/"v8") before it named the input's (nhwc/nchw):
        # installed manifests that say so keep loading.
        if isinstance(data, dict) and data.get("layout") in ("v5", "v8") and "output_layout" not in data:
            data = {k: v for k, v in data.items() if k != "layout"} | {"output_layout": data["layout"]}
        return data


@register
class Yolo(PlannedInput, Handler):
    name = "yolo"
    description = "Ultralytics YOLO / RT-DETR ONNX export (v8 [1,4+C,N], v5 [1,N,5+C], end2end [1,K,6], RT-DETR)"
    options_model = YoloOptions
    options: YoloOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        spec, out = signature.inputs[0], signature.outputs[0]
        self._input, self._output = spec.name, out.name
        d1, d2 = out.shape[1:]
        self._head: Head | None = self.options.output_layout or head_of(d1, d2, self.metadata)
        if self._head == "end2end" and d2 not in (6, None):
            raise HandlerMismatch(f"an end2end output has rows of 6 (x1, y1, x2, y2, score, class), not {d2}")
        self._classes = _num_classes(self._head, d1, d2, self.metadata)
        layout = input_layout(spec, self.options.layout, "NCHW")
        size = input_size(self.options, spec, layout, self.metadata, (640, 640))
        resize: Literal["letterbox", "stretch"] = "stretch" if self._head == "rtdetr" else "letterbox"
        self._prep = preprocess_plan(self.options, spec, size, layout, scale=_SCALE, resize=resize, fill=_FILL)
        self._iou = self.options.iou_threshold

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        if signature.format != "onnx" or len(signature.inputs) != 1 or len(signature.outputs) != 1:
            return False
        spec, out = signature.inputs[0], signature.outputs[0]
        if spec.rank != 4 or spec.shape[0] not in (1, None) or 3 not in (spec.shape[1], spec.shape[3]):
            return False
        if spec.dtype != "float32" or out.dtype != "float32" or out.rank != 3:
            return False
        d1, d2 = out.shape[1:]
        if d1 is None or d2 is None:  # dynamic axes: the layout is read from the output itself
            return True
        # A row (v5, end2end, rtdetr) or column (v8) holds a box and at least one class score.
        return min(d1, d2) >= 5 and d1 != d2

    @property
    def num_classes(self) -> int | None:
        return self._classes

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, geo = self._prep(image)
        return Prepared({self._input: tensor}, image.size, {"letterbox": geo})

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        raw = np.asarray(outputs[self._output], dtype=np.float32)
        d1, d2 = raw.shape[-2:]
        raw = raw.reshape(d1, d2)
        head = self._head or head_of(d1, d2, self.metadata) or ("v8" if d1 <= d2 else "v5")
        if head == "v8":
            xyxy, scores, classes = self._v8(raw)
        elif head == "v5":
            xyxy, scores, classes = self._v5(raw)
        elif head == "end2end":
            xyxy, scores, classes = self._end2end(raw)
        else:
            xyxy, scores, classes = self._rtdetr(raw)
        if len(scores) > _MAX_CANDIDATES:
            top = np.argpartition(-scores, _MAX_CANDIDATES)[:_MAX_CANDIDATES]
            xyxy, classes, scores = xyxy[top], classes[top], scores[top]
        mode = self.options.nms or ("per-class" if head in ("v5", "v8") else "none")
        if mode == "per-class":
            kept = nms_per_class(xyxy, scores, classes, self._iou)
            xyxy, scores, classes = xyxy[kept], scores[kept], classes[kept]
        elif mode == "agnostic":
            kept = nms(xyxy, scores, self._iou)
            xyxy, scores, classes = xyxy[kept], scores[kept], classes[kept]
        geo: Letterbox = prepared.meta["letterbox"]
        return to_detections(geo.to_image(xyxy), scores, classes)

    # Each decoder: raw output -> (xyxy boxes in input pixels, scores, class ids) above min_score.

    def _v8(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Filter on the [C, N] view before transposing: only survivors get copied.
        class_scores = raw[4:]
        scores = class_scores.max(axis=0)
        keep = np.flatnonzero(scores >= self.min_score)
        return cxcywh_to_xyxy(raw[:4, keep].T), scores[keep], class_scores[:, keep].argmax(axis=0)

    def _v5(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # score = objectness * class score <= objectness: cut on objectness first.
        rows = raw[raw[:, 4] >= self.min_score]
        weighted = rows[:, 5:] * rows[:, 4:5]
        classes = weighted.argmax(axis=1)
        scores = weighted[np.arange(len(rows)), classes]
        keep = np.flatnonzero(scores >= self.min_score)
        return cxcywh_to_xyxy(rows[keep, :4]), scores[keep], classes[keep]

    def _end2end(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Rows past the model's detections are padding with score 0; a class id must be one.
        rows = raw[(raw[:, 4] >= self.min_score) & np.isfinite(raw[:, 5]) & (raw[:, 5] >= 0)]
        return rows[:, :4], rows[:, 4], np.rint(rows[:, 5]).astype(np.int64)

    def _rtdetr(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        class_scores = raw[:, 4:]
        scores = class_scores.max(axis=1)
        keep = np.flatnonzero(scores >= self.min_score)
        w, h = self._prep.size
        boxes = raw[keep, :4] * np.array([w, h, w, h], np.float32)
        return cxcywh_to_xyxy(boxes), scores[keep], class_scores[keep].argmax(axis=1)
