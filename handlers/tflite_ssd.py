"""SSD-style detectors whose graph ends in a post-processing op (boxes, classes, scores, count).

``PostProcessedSsd`` holds what the TFLite (``TFLite_Detection_PostProcess``: TF detection zoo,
Model Maker, EfficientDet-Lite) and ONNX (zoo ssd_mobilenet_v1) variants share: finding which
output is which, and turning them into detections. Boxes come out as (ymin, xmin, ymax, xmax)
normalised to the input tensor; SSD models are trained on plain (stretched) resizes, so they are
normalised to the image as well (with ``"resize": "letterbox"`` they are mapped back through the
letterbox).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from handlers.base import Detection, Handler, HandlerMismatch, Prepared, Signature, TensorSpec, register
from handlers.boxes import to_detections, yxyx_to_xyxy
from handlers.imaging import Letterbox, PixelScale
from handlers.options import HandlerOptions, Number, ResizeOptions
from handlers.preprocess import PlannedInput, input_layout, input_size, preprocess_plan

__all__ = ["PostProcessedSsd", "TfliteSsd", "TfliteSsdOptions"]

_TF1_PREFIX = "TFLite_Detection_PostProcess"


def ssd_outputs_fit(outputs: tuple[TensorSpec, ...]) -> bool:
    """Four float outputs: boxes [1,N,4], two [1,N] (classes, scores) and a count [1]."""
    if len(outputs) != 4 or sorted(o.rank for o in outputs) != [1, 2, 2, 3]:
        return False
    boxes = next(o for o in outputs if o.rank == 3)
    return boxes.shape[-1] in (4, None) and all(o.dtype.startswith("float") for o in outputs)


def image_input(signature: Signature, dtypes: tuple[str, ...]) -> TensorSpec | None:
    """The single RGB input (NHWC, or NCHW when its shape says so) of one of ``dtypes``, if that is
    what the model takes."""
    if len(signature.inputs) != 1:
        return None
    spec = signature.inputs[0]
    if spec.rank != 4 or spec.shape[0] not in (1, None) or 3 not in (spec.shape[1], spec.shape[3]):
        return None
    return spec if spec.dtype in dtypes else None


class PostProcessedSsd(PlannedInput, Handler):
    """Shared part of the SSD families (not registered itself)."""

    input_dtypes: ClassVar[tuple[str, ...]] = ("uint8",)
    # Size to feed when the model's input height/width are dynamic.
    default_size: ClassVar[tuple[int, int]] = (300, 300)
    options_model: ClassVar[type[HandlerOptions]] = ResizeOptions
    options: ResizeOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        spec = signature.inputs[0]
        self._input = spec.name
        layout = input_layout(spec, self.options.layout, "NHWC")
        size = input_size(self.options, spec, layout, self.metadata, self.default_size)
        self._prep = preprocess_plan(self.options, spec, size, layout, scale=self._input_scale(spec),
                                     resize="stretch", fill=0)
        self._int8 = spec.dtype == "int8"
        by_rank: dict[int, list[str]] = {}
        for o in signature.outputs:
            by_rank.setdefault(o.rank, []).append(o.name)
        self._boxes, self._count = by_rank[3][0], by_rank[1][0]
        first, second = by_rank[2]
        self._pair = (first, second)
        # (classes, scores) when the names say so; otherwise decided from the values per call.
        self._named: tuple[str, str] | None = None
        if all(n.startswith(_TF1_PREFIX) for n in (first, second)):
            # TF1 converters name the op's outputs in its order: boxes, :1 classes, :2 scores, :3 count.
            self._named = (first, second) if first.endswith(":1") else (second, first)
        elif "class" in first.lower() and "score" in second.lower():
            self._named = (first, second)
        elif "score" in first.lower() and "class" in second.lower():
            self._named = (second, first)

    def _input_scale(self, spec: TensorSpec) -> PixelScale | None:
        return None  # raw uint8 pixels

    def preprocess(self, image: Image.Image) -> Prepared:
        tensor, geo = self._prep(image)
        if self._int8:
            # int8 models take raw pixels shifted by the zero point: p ^ 0x80 read as int8 is p - 128.
            np.bitwise_xor(tensor, 0x80, out=tensor)
            tensor = tensor.view(np.int8)
        return Prepared({self._input: tensor}, image.size, {"letterbox": geo})

    def _classes_and_scores(self, outputs: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = (np.asarray(outputs[name], dtype=np.float32).reshape(-1)[:n] for name in self._pair)
        if self._named is not None:
            first_is_classes = self._named[0] == self._pair[0]
        else:
            # TF2 converters scramble the output order and names: class ids are whole numbers,
            # scores lie in [0, 1]; the first test that tells them apart decides.
            first_is_classes = True
            for test in (_integral, lambda x: not _unit(x)):
                ta, tb = test(a), test(b)
                if ta != tb:
                    first_is_classes = ta
                    break
        return (a, b) if first_is_classes else (b, a)

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        boxes = np.asarray(outputs[self._boxes], dtype=np.float32).reshape(-1, 4)
        count = np.asarray(outputs[self._count]).reshape(-1)
        # Rows past the count are padding and may hold anything.
        n = max(0, min(int(count[0]) if count.size else 0, boxes.shape[0]))
        classes, scores = self._classes_and_scores(outputs, n)
        keep = scores >= self.min_score
        xyxy = yxyx_to_xyxy(boxes[:n][keep])
        if self._prep.keep_aspect:  # normalised to the input: through the letterbox to the image
            geo: Letterbox = prepared.meta["letterbox"]
            w, h = self._prep.size
            xyxy = geo.to_image(xyxy * np.array([w, h, w, h], np.float32))
        return to_detections(xyxy, scores[keep], classes[keep].astype(np.int64))


def _integral(x: np.ndarray) -> bool:
    return bool(np.all(x == np.round(x)))


def _unit(x: np.ndarray) -> bool:
    return bool(np.all((x >= 0.0) & (x <= 1.0)))


class TfliteSsdOptions(ResizeOptions):
    """handler_options of ``tflite_ssd``."""

    forms: ClassVar[dict[str, str]] = {"input_range": "[low, high], two numbers, e.g. [-1, 1]"}

    input_range: tuple[Number, Number] | None = None
    """[low, high]: the values pixels 0..255 map onto, for float inputs (quantized inputs take raw pixels).
    Default [-1, 1]; mean/std say the same per channel (give one or the other)."""


@register
class TfliteSsd(PostProcessedSsd):
    """TFLite SSD with the TFLite_Detection_PostProcess op (class ids 0-based, no background)."""

    name = "tflite_ssd"
    description = "TFLite SSD / EfficientDet-Lite with TFLite_Detection_PostProcess"
    input_dtypes = ("float32", "uint8", "int8")
    options_model = TfliteSsdOptions
    options: TfliteSsdOptions

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return (
            signature.format == "tflite"
            and image_input(signature, cls.input_dtypes) is not None
            and ssd_outputs_fit(signature.outputs)
        )

    def _input_scale(self, spec: TensorSpec) -> PixelScale | None:
        if spec.dtype != "float32":
            # Quantized inputs take raw pixels (int8: shifted by 128): the converter calibrates
            # the input scale/zero point so that 0..255 lands on the range the float model was
            # trained on, whatever that range was. Normalising here would apply it twice.
            return None
        if self.options.input_range is not None and (self.options.mean or self.options.std):
            raise HandlerMismatch("handler_options: give input_range or mean/std, not both")
        low, high = self.options.input_range or (-1.0, 1.0)
        return PixelScale.to_range(low, high)
