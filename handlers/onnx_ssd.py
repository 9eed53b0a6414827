"""ONNX model zoo ssd_mobilenet_v1 (exported from the TF detection API).

Input: uint8 NHWC ``image_tensor:0`` with dynamic height/width. The graph resizes to 300x300
itself (a plain bilinear stretch), so feeding 300x300 costs the model nothing and spares it a
large resize. Outputs ``detection_boxes`` (ymin, xmin, ymax, xmax, normalised),
``detection_classes`` (float, 1-based COCO ids), ``detection_scores``, ``num_detections``.

Class ids are returned as the model gives them (1-based): the labels file of this model lists
a background entry at index 0, so id N is line N of the file.
"""

from __future__ import annotations

from handlers.base import Signature, register
from handlers.tflite_ssd import PostProcessedSsd, image_input, ssd_outputs_fit

__all__ = ["OnnxSsd"]


@register
class OnnxSsd(PostProcessedSsd):
    name = "onnx_ssd"
    description = "ONNX SSD (TF detection API export: uint8 NHWC in, boxes/classes/scores/count out)"
    input_dtypes = ("uint8",)

    @classmethod
    def matches(cls, signature: Signature) -> bool:
        return (
            signature.format == "onnx"
            and image_input(signature, cls.input_dtypes) is not None
            and ssd_outputs_fit(signature.outputs)
        )
