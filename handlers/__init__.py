"""Model families: each module registers one handler (pre/post-processing) in ``handlers.base``."""

from handlers.base import REGISTRY, Detection, Handler, Prepared, Signature, TensorSpec, choose_handler

# Importing a family registers it. Keep this list explicit: it is the registry's table of contents.
from . import classifier, mediapipe_ssd, onnx_ssd, onnx_yolov3, tflite_ssd, yolo  # noqa: F401  isort: skip

__all__ = ["REGISTRY", "Detection", "Handler", "Prepared", "Signature", "TensorSpec", "choose_handler"]
