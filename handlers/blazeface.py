"""MediaPipe BlazeFace face detectors (short range 128x128, full range 192x192).

The models output raw anchor offsets; decoding follows MediaPipe's face_detection graphs
(mediapipe/modules/face_detection/face_detection_{short,full}_range.pbtxt and the shared
face_detection.pbtxt) step by step:

- ImageToTensorCalculator: keep_aspect_ratio (centred letterbox), BORDER_ZERO (black padding),
  float range [-1, 1];
- SsdAnchorsCalculator: anchor_offset 0.5, aspect_ratios [1.0], fixed_anchor_size (w = h = 1);
  short: num_layers 4, strides [8, 16, 16, 16], interpolated_scale_aspect_ratio 1.0 (896 anchors);
  full: num_layers 1, strides [4], interpolated_scale_aspect_ratio 0.0 (2304 anchors);
- TensorsToDetectionsCalculator: num_coords 16, box_coord_offset 0, reverse_output_order (x, y,
  w, h), x/y/w/h_scale = input size, sigmoid_score with score_clipping_thresh 100,
  min_score_thresh 0.5 (short) / 0.6 (full); boxes of negative width/height are dropped;
- NonMaxSuppressionCalculator: min_suppression_threshold 0.3, INTERSECTION_OVER_UNION, WEIGHTED,
  run in tensor space (before DetectionProjectionCalculator undoes the letterbox).
Keypoints (eyes, nose, mouth, ears) are not returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from handlers.base import Detection, Handler, Prepared, Signature, TensorSpec, register
from handlers.boxes import to_detections, weighted_nms
from handlers.imaging import Letterbox, PixelScale, image_to_tensor
from handlers.options import HandlerOptions

__all__ = ["BlazeFace", "ssd_anchor_centers"]

_NUM_COORDS = 16
_SCORE_CLIP = 100.0
_SUPPRESSION_IOU = 0.3
_SCALE = PixelScale.to_range(-1.0, 1.0)


@dataclass(frozen=True)
class _Variant:
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float
    min_score_thresh: float


# Keyed by input size (square).
_VARIANTS = {
    128: _Variant((8, 16, 16, 16), 1.0, 0.5),  # short range
    192: _Variant((4,), 0.0, 0.6),  # full range
}


@cache
def ssd_anchor_centers(
    size: int, strides: tuple[int, ...], interpolated_scale_aspect_ratio: float, offset: float = 0.5
) -> np.ndarray:
    """Anchor centres (x, y), normalised, in SsdAnchorsCalculator's order, for one aspect ratio
    (1.0) and fixed anchor size, as the face graphs configure it. Shape (N, 2), read-only."""
    per_layer = 1 + (1 if interpolated_scale_aspect_ratio > 0.0 else 0)
    parts = []
    layer = 0
    while layer < len(strides):
        # Consecutive layers with the same stride share one feature map: their anchors are
        # interleaved per cell.
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        fm = math.ceil(size / strides[layer])
        ys, xs = np.meshgrid(np.arange(fm), np.arange(fm), indexing="ij")
        centers = np.stack(((xs.ravel() + offset) / fm, (ys.ravel() + offset) / fm), axis=1)
        parts.append(np.repeat(centers, per_layer * (same - layer), axis=0))
        layer = same
    anchors = np.concatenate(parts).astype(np.float32)
    anchors.flags.writeable = False
    return anchors


def _variant_anchors(size: int) -> np.ndarray:
    v = _VARIANTS[size]
    return ssd_anchor_centers(size, v.strides, v.interpolated_scale_aspect_ratio)


def _roles(signature: Signature) -> tuple[TensorSpec, TensorSpec, TensorSpec] | None:
    """(input, regressors, classificators) when the signature is a BlazeFace one."""
    if len(signature.inputs) != 1 or len(signature.outputs) != 2:
        return None
    spec = signature.inputs[0]
    if spec.dtype != "float32" or spec.rank != 4 or spec.shape[0] != 1 or spec.shape[3] != 3:
        return None
    size = spec.shape[1]
    if size not in _VARIANTS or spec.shape[2] != size:
        return None
    n = len(_variant_anchors(size))
    regs = [o for o in signature.outputs if o.shape == (1, n, _NUM_COORDS) and o.dtype == "float32"]
    cls = [o for o in signature.outputs if o.shape == (1, n, 1) and o.dtype == "float32"]
    if len(regs) != 1 or len(cls) != 1:
        return None
    return spec, regs[0], cls[0]


@register
class BlazeFace(Handler):
    name = "blazeface"
    description = "MediaPipe BlazeFace face detector (short range 128 / full range 192)"

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        roles = _roles(signature)
        if roles is None:
            raise ValueError("not a BlazeFace signature")
        spec, regs, cls = roles
        self._input, self._regressors, self._classificators = spec.name, regs.name, cls.name
        self._size = int(spec.shape[1] or 0)
        self._variant = _VARIANTS[self._size]
        self._anchors = _variant_anchors(self._size)

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return _roles(signature) is not None

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size, self._size

    @property
    def num_classes(self) -> int | None:
        return 1

    @property
    def min_score(self) -> float:
        # MediaPipe's min_score_thresh filters *before* the weighted blending, so it is part
        # of the decoding, not just a reporting cut-off.
        given = self.options.min_score
        return self._variant.min_score_thresh if given is None else given

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, geo = image_to_tensor(image, self.input_size, scale=_SCALE, keep_aspect=True, fill=0)
        return Prepared({self._input: tensor}, image.size, {"letterbox": geo})

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        # float64: exp(100) overflows float32 (harmlessly, to the same 0 score, but noisily).
        logits = np.asarray(outputs[self._classificators], dtype=np.float64).reshape(-1)
        scores = (1.0 / (1.0 + np.exp(-np.clip(logits, -_SCORE_CLIP, _SCORE_CLIP)))).astype(np.float32)
        idx = np.flatnonzero(scores >= self.min_score)
        if idx.size == 0:
            return []
        raw = np.asarray(outputs[self._regressors], dtype=np.float32).reshape(-1, _NUM_COORDS)[idx, :4]
        raw = raw / np.float32(self._size)  # x_scale = y_scale = w_scale = h_scale = input size
        center = raw[:, :2] + self._anchors[idx]  # anchor w = h = 1
        half = raw[:, 2:4] * 0.5
        boxes = np.concatenate((center - half, center + half), axis=1)
        valid = np.all(raw[:, 2:4] >= 0.0, axis=1) & np.all(np.isfinite(boxes), axis=1)
        boxes, scores = weighted_nms(boxes[valid], scores[idx][valid], _SUPPRESSION_IOU)
        geo: Letterbox = prepared.meta["letterbox"]
        return to_detections(geo.to_image(boxes * np.float32(self._size)), scores, 0)
