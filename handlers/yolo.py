"""Ultralytics-style YOLO ONNX exports (YOLOv5, YOLOv8 and later) without NMS in the graph.

One input [1,3,S,S] float (RGB /255, letterboxed on gray 114 as ultralytics does) and one raw
output in input pixels:
- YOLOv8+: [1, 4+C, N]: cx, cy, w, h, then C class scores (no objectness);
- YOLOv5:  [1, N, 5+C]: cx, cy, w, h, objectness, then C class scores (score = obj * class).
N (thousands of anchors) is far larger than 4+C, which tells the two layouts apart; the
``layout`` option ("v5"/"v8") forces one. Decoding keeps the best class per box, drops boxes
below ``min_score``, runs class-wise NMS (``iou_threshold``, default 0.45) and un-letterboxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from handlers.base import Detection, Handler, Prepared, Signature, register
from handlers.boxes import cxcywh_to_xyxy, nms_per_class, to_detections
from handlers.imaging import Letterbox, PixelScale, image_to_tensor
from handlers.options import HandlerOptions, SizedOptions

__all__ = ["Yolo", "YoloOptions"]

_SCALE = PixelScale.to_range(0.0, 1.0)
_FILL = 114
# Boxes kept for NMS at most (ultralytics uses 30000; past a few thousand it is all noise).
_MAX_CANDIDATES = 4096


def _is_v8(d1: int | None, d2: int | None) -> bool | None:
    """True for [4+C, N], False for [N, 5+C], None when the dims do not say."""
    if d1 is None or d2 is None or d1 == d2:
        return None
    return d1 < d2


class YoloOptions(SizedOptions):
    """handler_options of ``yolo``."""

    iou_threshold: float = Field(0.45, ge=0.0, le=1.0, strict=True)
    """Boxes of one class overlapping more than this (intersection over union) are merged by NMS."""
    layout: Literal["v5", "v8"] | None = None
    """Output layout when its shape does not tell: "v5" ([1,N,5+C]) or "v8" ([1,4+C,N])."""


@register
class Yolo(Handler):
    name = "yolo"
    description = "YOLOv5 / YOLOv8 ONNX export (raw [1,4+C,N] or [1,N,5+C] output, NMS here)"
    options_model = YoloOptions
    options: YoloOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        spec = signature.inputs[0]
        self._input = spec.name
        self._output = signature.outputs[0].name
        layout = self.options.layout
        d1, d2 = signature.outputs[0].shape[1:]
        self._v8: bool | None = {"v8": True, "v5": False}.get(layout) if layout else _is_v8(d1, d2)
        self._classes: int | None = None
        if self._v8 is True and d1:
            self._classes = d1 - 4
        elif self._v8 is False and d2:
            self._classes = d2 - 5
        h, w = spec.shape[2], spec.shape[3]
        self._size: tuple[int, int] = self.options.input_size or ((w, h) if w and h else (640, 640))
        self._iou = self.options.iou_threshold

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        if signature.format != "onnx" or len(signature.inputs) != 1 or len(signature.outputs) != 1:
            return False
        spec, out = signature.inputs[0], signature.outputs[0]
        if spec.rank != 4 or spec.shape[0] not in (1, None) or spec.shape[1] != 3:
            return False
        if spec.dtype != "float32" or out.dtype != "float32" or out.rank != 3:
            return False
        d1, d2 = out.shape[1:]
        if d1 is None or d2 is None:  # dynamic axes: the layout is read from the output itself
            return True
        # A row (v5) or column (v8) holds a box and at least one class score.
        return min(d1, d2) >= 5 and d1 != d2

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    @property
    def num_classes(self) -> int | None:
        return self._classes

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, geo = image_to_tensor(image, self._size, scale=_SCALE, layout="NCHW", fill=_FILL)
        return Prepared({self._input: tensor}, image.size, {"letterbox": geo})

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        raw = np.asarray(outputs[self._output], dtype=np.float32)
        d1, d2 = raw.shape[-2:]
        raw = raw.reshape(d1, d2)
        v8 = self._v8 if self._v8 is not None else d1 < d2
        if v8:
            # Filter on the [C, N] view before transposing: only survivors get copied.
            class_scores = raw[4:]
            scores = class_scores.max(axis=0)
            keep = np.flatnonzero(scores >= self.min_score)
            boxes = raw[:4, keep].T
            classes = class_scores[:, keep].argmax(axis=0)
            scores = scores[keep]
        else:
            # score = objectness * class score <= objectness: cut on objectness first.
            rows = raw[raw[:, 4] >= self.min_score]
            weighted = rows[:, 5:] * rows[:, 4:5]
            classes = weighted.argmax(axis=1)
            scores = weighted[np.arange(len(rows)), classes]
            keep = np.flatnonzero(scores >= self.min_score)
            boxes, classes, scores = rows[keep, :4], classes[keep], scores[keep]
        if len(scores) > _MAX_CANDIDATES:
            top = np.argpartition(-scores, _MAX_CANDIDATES)[:_MAX_CANDIDATES]
            boxes, classes, scores = boxes[top], classes[top], scores[top]
        xyxy = cxcywh_to_xyxy(boxes)
        kept = nms_per_class(xyxy, scores, classes, self._iou)
        geo: Letterbox = prepared.meta["letterbox"]
        return to_detections(geo.to_image(xyxy[kept]), scores[kept], classes[kept])
