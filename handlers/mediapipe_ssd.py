"""MediaPipe's SSD-anchor detectors: BlazeFace (short range, full range, back camera), palm
detection (BlazePalm) and pose detection (BlazePose's detector), and any model decoded the same way.

These models output raw offsets per anchor: one tensor [1, N, 4 + 2K] (box, then K keypoints) and
one of scores [1, N, 1]. Decoding follows MediaPipe's graphs (face_detection_*.pbtxt,
palm_detection_cpu.pbtxt, pose_detection_cpu.pbtxt) step by step:

- ImageToTensorCalculator: keep_aspect_ratio (centred letterbox), BORDER_ZERO (black padding),
  float range [-1, 1] (palm: [0, 1]);
- SsdAnchorsCalculator: anchors from its options (handlers/anchors.py);
- TensorsToDetectionsCalculator: box and keypoints scaled by x/y/w/h_scale (the input size) around
  their anchor, sigmoid scores clipped to +-score_clipping_thresh, boxes under min_score_thresh and
  of negative width/height dropped;
- NonMaxSuppressionCalculator: WEIGHTED (boxes and keypoints blended by score) at IoU 0.3, in
  tensor space, before the letterbox is undone (DetectionProjection / DetectionLetterboxRemoval).

The known models are recognised by their signature (input size, anchor count, values per anchor)
and carry MediaPipe's own options. Any other model decoded this way takes them from
``handler_options`` (``anchors``: SsdAnchorsCalculatorOptions by MediaPipe's names, the decoder's
options beside it), with the handler named in model.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from handlers.anchors import SsdAnchorOptions, ssd_anchors
from handlers.base import Detection, Handler, HandlerMismatch, Prepared, Signature, TensorSpec, register
from handlers.boxes import nms, to_detections, weighted_nms
from handlers.imaging import Letterbox, PixelScale, image_to_tensor
from handlers.options import HandlerOptions, Number, Score

__all__ = ["KNOWN_MODELS", "KnownModel", "MediapipeSsd", "MediapipeSsdOptions"]

_Positive = Annotated[float, Field(gt=0.0, strict=True, allow_inf_nan=False)]


class MediapipeSsdOptions(HandlerOptions):
    """handler_options of ``mediapipe_ssd``: MediaPipe's decoder options, by its names. Left out, a
    known model gets MediaPipe's own values; another model needs at least ``anchors``."""

    forms: ClassVar[dict[str, str]] = {"input_range": "[low, high], two numbers, e.g. [-1, 1]"}

    anchors: SsdAnchorOptions | None = None
    """SsdAnchorsCalculatorOptions of the model's graph (num_layers, min_scale, max_scale, strides, ...)."""
    box_format: Literal["xywh", "yxhw"] | None = None
    """Order of the raw box values: "xywh" (MediaPipe's reverse_output_order: true, every known model)
    or "yxhw"; keypoints follow the same x/y order."""
    x_scale: _Positive | None = None
    """Divisor of the raw x offsets (box centre and keypoints); default: the input width."""
    y_scale: _Positive | None = None
    """Divisor of the raw y offsets; default: the input height."""
    w_scale: _Positive | None = None
    """Divisor of the raw box width; default: the input width."""
    h_scale: _Positive | None = None
    """Divisor of the raw box height; default: the input height."""
    apply_exponential_on_box_size: bool = False
    """Box sizes are exp(raw / scale) * anchor size (TF-style SSD) instead of raw / scale * anchor size."""
    sigmoid_score: bool = True
    """Raw scores are logits (turned into scores by the sigmoid)."""
    score_clipping_thresh: _Positive | None = 100.0
    """Logits are clipped to +-this before the sigmoid."""
    min_suppression_threshold: Score = 0.3
    """Detections overlapping the best one by more than this (IoU) are merged with (or dropped for) it."""
    nms_algorithm: Literal["weighted", "default"] = "weighted"
    """"weighted": the overlapping detections' boxes and keypoints are blended by score (MediaPipe's
    WEIGHTED, used by its face, palm and pose graphs); "default": they are dropped."""
    input_range: tuple[Number, Number] | None = None
    """[low, high]: the values pixels 0..255 map onto; default: the known model's, else [-1, 1]."""


@dataclass(frozen=True)
class KnownModel:
    """A MediaPipe detector whose graph options are built in, recognised by its signature."""

    title: str
    input_size: int  # square
    num_anchors: int
    num_coords: int  # 4 box values + 2 per keypoint
    anchors: SsdAnchorOptions
    min_score: float
    input_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def num_keypoints(self) -> int:
        return (self.num_coords - 4) // 2


def _anchors(**kw: Any) -> SsdAnchorOptions:
    return SsdAnchorOptions(fixed_anchor_size=True, **kw)


# The options of MediaPipe 0.10's graphs (the face ones from face_detection_*_range.pbtxt; the back
# camera from the retired face_detection_back_desktop_live.pbtxt).
KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("BlazeFace short range", 128, 896, 16,
               _anchors(num_layers=4, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 16, 16)), 0.5),
    KnownModel("BlazeFace full range", 192, 2304, 16,
               _anchors(num_layers=1, min_scale=0.1484375, max_scale=0.75, strides=(4,),
                        interpolated_scale_aspect_ratio=0.0), 0.6),
    KnownModel("BlazeFace back camera", 256, 896, 16,
               _anchors(num_layers=4, min_scale=0.15625, max_scale=0.75, strides=(16, 32, 32, 32)), 0.65),
    KnownModel("palm detection", 192, 2016, 18,
               _anchors(num_layers=4, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 16, 16)), 0.5,
               (0.0, 1.0)),
    KnownModel("pose detection", 224, 2254, 12,
               _anchors(num_layers=5, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 32, 32, 32)), 0.5),
)


@dataclass(frozen=True)
class _Roles:
    image: TensorSpec
    raw: TensorSpec  # [1, N, 4 + 2K]
    scores: TensorSpec  # [1, N, 1]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[2] or 0), int(self.image.shape[1] or 0)

    @property
    def num_anchors(self) -> int:
        return int(self.raw.shape[1] or 0)

    @property
    def num_coords(self) -> int:
        return int(self.raw.shape[2] or 0)


def _roles(signature: Signature) -> _Roles | None:
    """The tensors' roles when the signature has the shape of a MediaPipe SSD detector: one float
    NHWC RGB input of fixed size, a [1, N, 4 + 2K] output and a [1, N, 1] one."""
    if len(signature.inputs) != 1 or len(signature.outputs) != 2:
        return None
    spec = signature.inputs[0]
    if spec.dtype != "float32" or spec.rank != 4 or spec.shape[0] != 1 or spec.shape[3] != 3:
        return None
    if not spec.shape[1] or not spec.shape[2]:
        return None
    outs = [o for o in signature.outputs if o.dtype == "float32" and o.rank == 3 and o.shape[0] == 1]
    if len(outs) != 2:
        return None
    scores = [o for o in outs if o.shape[2] == 1]
    raw = [o for o in outs if o.shape[2] is not None and o.shape[2] >= 4 and o.shape[2] % 2 == 0]
    if len(scores) != 1 or len(raw) != 1 or raw[0] is scores[0]:
        return None
    n = raw[0].shape[1]
    if not n or scores[0].shape[1] != n:
        return None
    return _Roles(spec, raw[0], scores[0])


def known_model(signature: Signature) -> KnownModel | None:
    roles = _roles(signature)
    if roles is None:
        return None
    w, h = roles.size
    return next((k for k in KNOWN_MODELS if (k.input_size, k.input_size, k.num_anchors, k.num_coords)
                 == (w, h, roles.num_anchors, roles.num_coords)), None)


@register
class MediapipeSsd(Handler):
    name = "mediapipe_ssd"
    aliases = ("blazeface",)
    description = "MediaPipe SSD-anchor detectors: BlazeFace (short/full range, back camera), palm, pose"
    options_model = MediapipeSsdOptions
    options: MediapipeSsdOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        roles = _roles(signature)
        if roles is None:
            raise HandlerMismatch("not a MediaPipe SSD detector signature")
        self._input, self._raw, self._scores = roles.image.name, roles.raw.name, roles.scores.name
        self._size = roles.size
        self._coords = roles.num_coords
        self.known = known_model(signature)
        opts = self.options
        anchor_options = opts.anchors or (self.known.anchors if self.known else None)
        if anchor_options is None:
            raise HandlerMismatch(
                f"a model with {roles.num_anchors} anchors of {roles.num_coords} values at "
                f"{self._size[0]}x{self._size[1]} is no MediaPipe model known here: give its "
                "SsdAnchorsCalculator options as handler_options.anchors"
            )
        self._anchors = ssd_anchors(anchor_options, self._size)
        if len(self._anchors) != roles.num_anchors:
            raise HandlerMismatch(
                f"handler_options.anchors make {len(self._anchors)} anchors but the model has {roles.num_anchors}"
            )
        w, h = self._size
        # Every raw value is decoded as raw * multiplier + offset, per anchor and per (x, y) pair: pair 0
        # is the box centre, pair 1 its size, then the keypoints (MediaPipe: x / x_scale * anchor w +
        # anchor x centre; sizes: w / w_scale * anchor w). Made once, so a request does three
        # vectorised operations on its candidates, whatever the number of keypoints.
        pairs = self._coords // 2
        anchor_wh, anchor_xy = self._anchors[:, None, 2:4], self._anchors[:, None, 0:2]
        divisors = np.tile(np.array([opts.x_scale or w, opts.y_scale or h], np.float32), (pairs, 1))
        divisors[1] = (opts.w_scale or w, opts.h_scale or h)
        self._multiplier = np.ascontiguousarray(anchor_wh / divisors[None], dtype=np.float32)
        offset = np.repeat(anchor_xy, pairs, axis=1)
        offset[:, 1] = 0.0
        self._offset = np.ascontiguousarray(offset, dtype=np.float32)
        self._exp_divisor = divisors[1]
        self._yx = opts.box_format == "yxhw"
        low, high = opts.input_range or (self.known.input_range if self.known else (-1.0, 1.0))
        self._pixels = PixelScale.to_range(low, high)
        self._min_score = opts.min_score if opts.min_score is not None else (
            self.known.min_score if self.known else 0.5)
        self._clip = opts.score_clipping_thresh
        self._logit_floor = self._candidate_floor()

    def _candidate_floor(self) -> float:
        """Candidates are found on the raw logits (the sigmoid is monotonic), a hair below the
        threshold; their exact scores decide. -inf where every logit may pass (clipping lifts the
        lowest ones to a passing score, or the threshold is 0)."""
        if not self.options.sigmoid_score:
            return self._min_score
        if self._min_score <= 0.0:
            return -math.inf
        m = min(self._min_score, 1.0 - 1e-7)
        floor = math.log(m / (1.0 - m)) - 1e-3
        return -math.inf if self._clip is not None and floor <= -self._clip else floor

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return known_model(signature) is not None

    @classmethod
    def accepts(cls, signature: Signature, options: HandlerOptions) -> bool:
        # Named in model.json, any model of this shape is run: its anchors come from the options
        # (and a model known here without them is decoded as MediaPipe's graph says).
        return _roles(signature) is not None

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    @property
    def letterboxes(self) -> bool:
        return True  # MediaPipe keep_aspect_ratio

    @property
    def num_classes(self) -> int | None:
        return 1

    @property
    def num_keypoints(self) -> int:
        return (self._coords - 4) // 2

    @property
    def min_score(self) -> float:
        # MediaPipe's min_score_thresh filters *before* the weighted blending, so it is part of the
        # decoding, not just a reporting cut-off.
        return self._min_score

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, geo = image_to_tensor(image, self._size, scale=self._pixels, keep_aspect=True, fill=0)
        return Prepared({self._input: tensor}, image.size, {"letterbox": geo})

    def _scores_of(self, logits: np.ndarray) -> np.ndarray:
        if not self.options.sigmoid_score:
            return logits.astype(np.float32)
        # float64: exp(100) overflows float32 (harmlessly, to the same 0 score, but noisily).
        x = logits.astype(np.float64)
        if self._clip is not None:
            x = np.clip(x, -self._clip, self._clip)
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        logits = np.asarray(outputs[self._scores]).reshape(-1)
        idx = np.flatnonzero(logits >= self._logit_floor)
        scores = self._scores_of(logits[idx])
        keep = scores >= self._min_score
        idx, scores = idx[keep], scores[keep]
        n = idx.size
        if n == 0:
            return []
        raw = np.asarray(outputs[self._raw], dtype=np.float32).reshape(-1, self._coords)[idx].reshape(n, -1, 2)
        if self._yx:  # (y, x, h, w, ky, kx, ...) -> (x, y, w, h, kx, ky, ...)
            raw = raw[:, :, ::-1]
        decoded = raw * self._multiplier[idx] + self._offset[idx]  # (n, pairs, 2)
        if self.options.apply_exponential_on_box_size:
            decoded[:, 1] = np.exp(raw[:, 1] / self._exp_divisor) * self._anchors[idx, 2:4]
        center, size = decoded[:, 0], decoded[:, 1]
        # Rows: xmin, ymin, xmax, ymax, then the keypoints (the weighted NMS blends them all).
        decoded[:, 0], decoded[:, 1] = center - size * np.float32(0.5), center + size * np.float32(0.5)
        rows = decoded.reshape(n, -1)
        valid = (size >= 0.0).all(axis=1) & np.isfinite(rows[:, :4]).all(axis=1)
        if not valid.all():
            rows, scores = rows[valid], scores[valid]
        if self.options.nms_algorithm == "weighted":
            rows, scores = weighted_nms(rows, scores, self.options.min_suppression_threshold)
        else:
            kept = nms(rows, scores, self.options.min_suppression_threshold)
            rows, scores = rows[kept], scores[kept]
        # Undo the letterbox: 0..1 of the input -> 0..1 of the image, every x/y pair at once.
        geo: Letterbox = prepared.meta["letterbox"]
        (cw, ch), (left, top) = geo.content_size, geo.offset
        w, h = self._size
        xy = rows.reshape(len(rows), -1, 2) * np.array([w / cw, h / ch], np.float32) - np.array(
            [left / cw, top / ch], np.float32)
        return to_detections(xy[:, :2].reshape(-1, 4), scores, 0, keypoints=xy[:, 2:])
