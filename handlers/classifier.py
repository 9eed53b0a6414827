"""Image classifiers (MobileNet, EfficientNet-Lite, ResNet, ...): one image in, one score per class out.

One image input, NHWC [1,H,W,3] (TFLite) or NCHW [1,3,H,W] (ONNX), float or quantized (uint8,
int8), and one output [1, C]. Answers come from ``classify`` (probabilities per class), not
``postprocess``: the engine serves them on ``POST /classify``.

- Preprocessing: the central ``central_crop`` of the image, resized (stretched) to the input.
  Float inputs: NHWC models get pixels mapped onto [-1, 1] (TF/TFLite MobileNet, EfficientNet-Lite),
  NCHW models ImageNet's mean/std (torchvision, the ONNX model zoo); ``mean``/``std`` or
  ``input_range`` say otherwise. Quantized inputs take raw pixels (int8: pixel - 128), their
  quantization parameters already map them onto what the model was trained on.
- Outputs: quantized ones are dequantized (scale, zero point); scores that are not already a
  distribution (logits: any value outside 0..1, or not summing to 1; a quantized output whose
  range is [0, 1] is one) go through a softmax.
- Labels: ImageNet models come with 1001 outputs (row 0 "background", TF) or 1000, and labels
  files with either count; a labels file one shorter than the outputs gets the background row
  added, one longer loses its first row (``fit_labels``), so ids and names stay aligned. The
  background row is never answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from handlers.base import Detection, Handler, Prepared, Signature, TensorSpec, register
from handlers.imaging import PixelScale, image_to_tensor
from handlers.options import HandlerOptions, Number, SizedOptions

__all__ = ["ImageClassifier", "ImageClassifierOptions"]

_IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0.485, 0.456, 0.406 of 255
_IMAGENET_STD = (58.395, 57.12, 57.375)  # 0.229, 0.224, 0.225 of 255
_BACKGROUND = "background"
# Float scores summing to 1 within this are already a distribution (a softmax output).
_SUM_TOLERANCE = 1e-3

_Channels = tuple[Number, Number, Number]


class ImageClassifierOptions(SizedOptions):
    """handler_options of ``classifier``."""

    forms: ClassVar[dict[str, str]] = {
        "input_range": "[low, high], two numbers, e.g. [-1, 1]",
        "mean": "three numbers, one per channel in pixel units, e.g. [123.675, 116.28, 103.53]",
        "std": "three numbers above 0, one per channel in pixel units, e.g. [58.395, 57.12, 57.375]",
    }

    input_range: tuple[Number, Number] | None = None
    """[low, high]: the values pixels 0..255 map onto, for float inputs. Default: [-1, 1] for NHWC
    models; NCHW models get ImageNet's mean/std instead."""
    mean: _Channels | None = None
    """Per channel (R, G, B), in pixel units: float inputs are (pixel - mean) / std."""
    std: tuple[Annotated[float, Field(gt=0.0, strict=True)], ...] | None = Field(None, min_length=3, max_length=3)
    """Per channel (R, G, B), in pixel units (ImageNet: [58.395, 57.12, 57.375])."""
    central_crop: Annotated[float, Field(gt=0.0, le=1.0, strict=True)] = 1.0
    """Fraction of the image's width and height kept around its centre before resizing (ResNet's
    evaluation: 0.875)."""
    softmax: bool | None = None
    """Apply a softmax to the outputs: true, false, or left out to apply it when they are not
    already a distribution (logits)."""


def _image_input(signature: Signature) -> tuple[TensorSpec, bool] | None:
    """The single image input and whether it is NCHW."""
    if len(signature.inputs) != 1:
        return None
    spec = signature.inputs[0]
    if spec.rank != 4 or spec.shape[0] not in (1, None) or spec.dtype not in ("float32", "uint8", "int8"):
        return None
    if spec.shape[3] == 3:
        return spec, False
    if spec.shape[1] == 3:
        return spec, True
    return None


def _scores_output(signature: Signature) -> TensorSpec | None:
    if len(signature.outputs) != 1:
        return None
    out = signature.outputs[0]
    if out.rank != 2 or out.shape[0] not in (1, None) or out.dtype not in ("float32", "uint8", "int8"):
        return None
    return out if out.shape[1] is not None and out.shape[1] >= 2 else None


@register
class ImageClassifier(Handler):
    name = "classifier"
    task = "classify"
    tasks = frozenset({"classify"})  # an Ultralytics classification export says so in its metadata
    description = "Image classifier (MobileNet, EfficientNet-Lite, ResNet): one [1, C] score output"
    options_model = ImageClassifierOptions
    options: ImageClassifierOptions

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        super().__init__(signature, options)
        found = _image_input(signature)
        out = _scores_output(signature)
        if found is None or out is None:
            raise ValueError("not an image classifier signature")
        spec, self._nchw = found
        self._input, self._output = spec.name, out.name
        self._classes = int(out.shape[1] or 0)
        h, w = (spec.shape[2], spec.shape[3]) if self._nchw else (spec.shape[1], spec.shape[2])
        self._size: tuple[int, int] = self.options.input_size or ((w, h) if w and h else (224, 224))
        self._int8 = spec.dtype == "int8"
        self._float = spec.dtype == "float32"
        quant = signature.extra.get("quantization", {}).get(out.name, (0.0, 0))
        self._dequant = (float(quant[0]), int(quant[1])) if out.dtype != "float32" and quant[0] else None
        # A quantized output whose range is [0, 1] holds probabilities (the softmax is inside the
        # model, as in TF's quantized MobileNets): its small classes round to 0, so it need not sum to 1.
        self._quantized_probabilities = False
        if self._dequant is not None:
            scale, zero = self._dequant
            lowest = -128 if out.dtype == "int8" else 0
            self._quantized_probabilities = zero == lowest and scale * 255 <= 1.0 + 1e-6
        # (scale, offset) per channel for float inputs: tensor = pixel * scale + offset.
        self._norm: tuple[np.ndarray, np.ndarray] | None = None
        if self._float:
            opts = self.options
            if opts.mean is not None or opts.std is not None:
                mean, std = opts.mean or (0.0, 0.0, 0.0), opts.std or (1.0, 1.0, 1.0)
            elif opts.input_range is None and self._nchw:
                mean, std = _IMAGENET_MEAN, _IMAGENET_STD
            else:
                low, high = opts.input_range or (-1.0, 1.0)
                mean, std = (-low * 255.0 / (high - low),) * 3, (255.0 / (high - low),) * 3
            shape = (1, 3, 1, 1) if self._nchw else (1, 1, 1, 3)
            per_pixel = (1.0 / np.asarray(std, np.float64)).astype(np.float32).reshape(shape)
            offset = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32).reshape(shape)
            self._norm = (per_pixel, offset)
        self._background: int | None = None  # the output row that is "background", never answered

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return _image_input(signature) is not None and _scores_output(signature) is not None

    @property
    def input_size(self) -> tuple[int, int]:
        return self._size

    @property
    def num_classes(self) -> int | None:
        return self._classes

    def fit_labels(self, labels: Sequence[str]) -> list[str]:
        names = list(labels)
        if len(names) == self._classes - 1:  # TF's 1001 outputs, a 1000-name labels file
            names.insert(0, _BACKGROUND)
        elif len(names) == self._classes + 1:  # a 1001-name labels file, 1000 outputs
            names.pop(0)
        elif len(names) != self._classes:
            raise ValueError(f"labels file has {len(names)} names but the classifier outputs {self._classes} "
                             f"scores (one name per class, or one fewer or more for a background row)")
        self._background = 0 if names and names[0].strip().lower() in (_BACKGROUND, "???", "unknown") else None
        return names

    def preprocess(self, image: Image.Image) -> Prepared:
        size = image.size
        if self.options.central_crop < 1.0:
            w, h = size
            cw, ch = max(1, round(w * self.options.central_crop)), max(1, round(h * self.options.central_crop))
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        layout: Literal["NHWC", "NCHW"] = "NCHW" if self._nchw else "NHWC"
        if self._norm is None:
            tensor, _ = image_to_tensor(image, self._size, scale=None, layout=layout, keep_aspect=False)
            if self._int8:
                # int8 models take raw pixels shifted by the zero point: p ^ 0x80 read as int8 is p - 128.
                np.bitwise_xor(tensor, 0x80, out=tensor)
                tensor = tensor.view(np.int8)
        else:
            tensor, _ = image_to_tensor(image, self._size, scale=PixelScale(1.0), layout=layout, keep_aspect=False)
            scale, offset = self._norm
            np.multiply(tensor, scale, out=tensor)
            np.add(tensor, offset, out=tensor)
        return Prepared({self._input: tensor}, size)

    def classify(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> np.ndarray:
        """Probabilities per class (float64, shape (C,)); the background row, if any, is 0."""
        raw = np.asarray(outputs[self._output]).reshape(-1)
        if self._dequant is not None:
            scale, zero = self._dequant
            scores = (raw.astype(np.float64) - zero) * scale
        else:
            scores = raw.astype(np.float64)
        softmax = self.options.softmax
        if softmax is None:
            distribution = self._quantized_probabilities or (
                bool(np.all((scores >= 0.0) & (scores <= 1.0))) and abs(scores.sum() - 1.0) <= _SUM_TOLERANCE)
            softmax = not distribution
        if softmax:
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        if self._background is not None:
            scores[self._background] = 0.0
        return scores

    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        raise TypeError("an image classifier makes no detections: use classify()")
