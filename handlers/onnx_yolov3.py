"""ONNX model zoo YOLOv3 and tiny-YOLOv3 (keras2onnx exports with NMS inside the graph).

Inputs: ``input_1`` [1,3,416,416] float (image letterboxed on gray 128, /255) and
``image_shape`` [1,2] float (the image's height, width). The graph undoes the letterbox itself:
``boxes`` [1,N,4] come out as (y1, x1, y2, x2) in pixels of the image described by
``image_shape``; ``scores`` are [1,C,N]; ``indices`` list the kept (batch, class, box) triples,
[1,M,3] in tiny-yolov3-11 and [M,3] in yolov3-10. Output names differ between the two
releases, so outputs are told apart by dtype and shape.

Because the graph itself undoes a centred letterbox, this family takes the preprocessing options
that keep that geometry (pixel_format, layout, mean/std, pad_value) and refuses resize and
pad_position by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from handlers.base import Detection, Handler, Prepared, Signature, TensorSpec, register
from handlers.boxes import to_detections, yxyx_to_xyxy
from handlers.imaging import PixelScale
from handlers.options import HandlerOptions, PreprocessOptions
from handlers.preprocess import PlannedInput, input_layout, input_size, preprocess_plan

__all__ = ["OnnxYoloV3"]

_INT = ("int32", "int64")
_SCALE = PixelScale.to_range(0.0, 1.0)
# The zoo's letterbox_image pads with gray (128, 128, 128).
_FILL = 128


def _roles(signature: Signature) -> tuple[TensorSpec, TensorSpec, TensorSpec, TensorSpec, TensorSpec] | None:
    """(image, image_shape, boxes, scores, indices) specs, or None if the signature differs."""
    if signature.format != "onnx" or len(signature.inputs) != 2 or len(signature.outputs) != 3:
        return None
    images = [i for i in signature.inputs if i.rank == 4 and (i.shape[1] in (3, None) or i.shape[3] == 3)]
    shapes = [i for i in signature.inputs if i.rank == 2 and i.shape[-1] in (2, None)]
    if len(images) != 1 or len(shapes) != 1 or images[0] is shapes[0]:
        return None
    if not (images[0].dtype == shapes[0].dtype == "float32"):
        return None
    indices = [o for o in signature.outputs if o.dtype in _INT and o.rank in (2, 3) and o.shape[-1] in (3, None)]
    floats = [o for o in signature.outputs if o.dtype == "float32" and o.rank == 3]
    if len(indices) != 1 or len(floats) != 2:
        return None
    # Boxes end in 4; when shapes are dynamic, keep the zoo's order (boxes first).
    boxes, scores = floats if floats[1].shape[-1] != 4 or floats[0].shape[-1] == 4 else floats[::-1]
    return images[0], shapes[0], boxes, scores, indices[0]


@register
class OnnxYoloV3(PlannedInput, Handler):
    name = "onnx_yolov3"
    description = "ONNX model zoo YOLOv3 / tiny-YOLOv3 (image + image_shape in, NMS indices out)"
    options_model = PreprocessOptions
    options: PreprocessOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        roles = _roles(signature)
        if roles is None:
            raise ValueError("not a YOLOv3 zoo signature")
        image, shape, boxes, scores, indices = roles
        self._image, self._shape = image.name, shape.name
        self._boxes, self._scores, self._indices = boxes.name, scores.name, indices.name
        self._classes = scores.shape[1]
        layout = input_layout(image, self.options.layout, "NCHW")
        size = input_size(self.options, image, layout, self.metadata, (416, 416))
        self._prep = preprocess_plan(self.options, image, size, layout, scale=_SCALE, resize="letterbox", fill=_FILL)

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return _roles(signature) is not None

    @property
    def num_classes(self) -> int | None:
        return self._classes

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, _ = self._prep(image)
        w, h = image.size
        shape = np.array([[h, w]], dtype=np.float32)
        return Prepared({self._image: tensor, self._shape: shape}, image.size)

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        boxes = np.asarray(outputs[self._boxes], dtype=np.float32)
        scores = np.asarray(outputs[self._scores], dtype=np.float32)
        if boxes.shape[-1] != 4 and scores.shape[-1] == 4:  # dynamic shapes guessed wrong at load
            boxes, scores = scores, boxes
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(scores.shape[-2], -1)
        # [1,M,3] and [M,3] alike: rows of (batch, class, box).
        triples = np.asarray(outputs[self._indices]).reshape(-1, 3).astype(np.intp)
        cls, idx = triples[:, 1], triples[:, 2]
        picked = scores[cls, idx]
        keep = picked >= self.min_score
        w, h = prepared.image_size
        xyxy = yxyx_to_xyxy(boxes[idx[keep]]) / np.array([w, h, w, h], dtype=np.float32)
        return to_detections(xyxy, picked[keep], cls[keep])
