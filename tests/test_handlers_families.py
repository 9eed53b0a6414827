"""End to end per family: generated model -> runtime -> preprocess/run/postprocess -> known boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import pytest
from modelgen import SSD_TRUTH, YOLO_TRUTH, YOLOV3_TRUTH, Truth
from PIL import Image

from handlers import Detection, Handler, Signature, TensorSpec, choose_handler
from handlers.runtimes import Runtime, open_runtime


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def load(path: Path, options: Mapping[str, Any] | None = None) -> tuple[Runtime, Handler]:
    runtime = open_runtime(path)
    return runtime, choose_handler(runtime.signature, options=options)


def detect(runtime: Runtime, handler: Handler, image: Image.Image) -> list[Detection]:
    prepared = handler.preprocess(image)
    assert prepared.image_size == image.size
    return handler.postprocess(runtime.run(prepared.feeds), prepared)


def assert_detections(found: list[Detection], expected: Sequence[Truth], atol: float = 1e-5) -> None:
    want = sorted(expected, key=lambda t: -t[1])
    assert [d.class_id for d in found] == [t[0] for t in want]
    np.testing.assert_allclose([d.score for d in found], [t[1] for t in want], atol=1e-6)
    np.testing.assert_allclose([d.box for d in found], [t[2] for t in want], atol=atol)


# -- ONNX zoo YOLOv3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [modelgen.tiny_yolov3_onnx, modelgen.yolov3_10_onnx], ids=["tiny11", "v3-10"])
@pytest.mark.parametrize("size", [(500, 375), (300, 600)])
def test_yolov3_boxes_come_back_normalised_to_the_image(
    tmp_path: Path, build: Any, size: tuple[int, int]
) -> None:
    runtime, handler = load(build(tmp_path / "yolov3.onnx"))
    assert handler.name == "onnx_yolov3"
    assert handler.input_size == (416, 416) and handler.num_classes == 80
    # The model scales its boxes by image_shape: right boxes prove (h, w) went in that order.
    assert_detections(detect(runtime, handler, photo(*size)), YOLOV3_TRUTH)


def test_yolov3_feeds_are_letterboxed_on_gray(tmp_path: Path) -> None:
    _, handler = load(modelgen.tiny_yolov3_onnx(tmp_path / "tiny.onnx"))
    feeds = handler.preprocess(Image.new("RGB", (640, 480), (255, 255, 255))).feeds
    np.testing.assert_array_equal(feeds["image_shape"], [[480, 640]])
    image = feeds["input_1"]
    assert image.shape == (1, 3, 416, 416) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, :, :52], 128 / 255, atol=1e-6)  # 416x312 content, 52 px bands
    np.testing.assert_allclose(image[0, :, 52:364], 1.0, atol=1e-6)
    np.testing.assert_allclose(image[0, :, 364:], 128 / 255, atol=1e-6)


def test_yolov3_min_score_option(tmp_path: Path) -> None:
    runtime, handler = load(modelgen.yolov3_10_onnx(tmp_path / "v3.onnx"), {"min_score": 0.7})
    assert_detections(detect(runtime, handler, photo(320, 240)), YOLOV3_TRUTH[:2])


# -- ONNX zoo SSD-MobileNet ------------------------------------------------------------------------------


def test_onnx_ssd_honours_the_count_and_keeps_ids(tmp_path: Path) -> None:
    runtime, handler = load(modelgen.ssd_mobilenet_onnx(tmp_path / "ssd.onnx"))
    assert handler.name == "onnx_ssd" and handler.num_classes is None
    assert handler.input_size == (300, 300)  # dynamic H/W: the size the graph resizes to anyway
    # The rows past num_detections hold a 0.99 decoy; ids stay 1-based as the model gives them.
    assert_detections(detect(runtime, handler, photo(640, 480)), SSD_TRUTH)


def test_onnx_ssd_feed_is_a_raw_stretched_image(tmp_path: Path) -> None:
    _, handler = load(modelgen.ssd_mobilenet_onnx(tmp_path / "ssd.onnx"), {"input_size": [320, 240]})
    image = photo(640, 480)
    feed = handler.preprocess(image).feeds["image_tensor:0"]
    assert feed.dtype == np.uint8 and feed.shape == (1, 240, 320, 3)
    np.testing.assert_array_equal(feed[0], np.asarray(image.resize((320, 240), Image.Resampling.BILINEAR)))


# -- TFLite SSD with TFLite_Detection_PostProcess ----------------------------------------------------


@pytest.mark.parametrize(
    "variant", [{}, {"quantized": True}, {"scrambled": True}, {"quantized": True, "scrambled": True}]
)
def test_tflite_ssd_decodes_the_postprocess_op(tmp_path: Path, variant: dict[str, bool]) -> None:
    runtime, handler = load(modelgen.ssd_tflite(tmp_path / "ssd.tflite", **variant))
    assert handler.name == "tflite_ssd" and handler.input_size == (300, 300)
    assert_detections(detect(runtime, handler, photo(500, 400)), SSD_TRUTH)


def test_tflite_ssd_scrambled_order_is_told_apart_by_values(tmp_path: Path) -> None:
    # Scores come first among the [1,N] outputs here, so trusting output order would swap them.
    truth: list[Truth] = [(0, 0.9, (0.1, 0.1, 0.3, 0.3)), (1, 0.5, (0.6, 0.6, 0.9, 0.9))]
    runtime, handler = load(modelgen.ssd_tflite(tmp_path / "ssd.tflite", truth, scrambled=True))
    first = runtime.signature.outputs[0]
    assert (first.name, first.shape) == ("StatefulPartitionedCall:0", (1, 10))
    scores = runtime.run(handler.preprocess(photo(64, 64)).feeds)[first.name]
    np.testing.assert_allclose(scores[0, :2], [0.9, 0.5], atol=1e-6)
    assert_detections(detect(runtime, handler, photo(64, 64)), truth)


def test_tflite_ssd_input_normalisation(tmp_path: Path) -> None:
    half = Image.new("RGB", (40, 30), (0, 255, 0))
    _, handler = load(modelgen.ssd_tflite(tmp_path / "float.tflite"))
    feed = handler.preprocess(half).feeds["normalized_input_image_tensor"]
    assert feed.dtype == np.float32 and feed.shape == (1, 300, 300, 3)
    np.testing.assert_allclose(feed[0, 5, 5], [-1.0, 1.0, -1.0], atol=1e-6)  # default range [-1, 1]
    _, handler = load(modelgen.ssd_tflite(tmp_path / "float.tflite"), {"input_range": [0, 1]})
    np.testing.assert_allclose(
        handler.preprocess(half).feeds["normalized_input_image_tensor"][0, 5, 5], [0.0, 1.0, 0.0], atol=1e-6
    )
    # uint8-quantized input: raw pixels, which the input quantization maps onto [-1, 1].
    _, handler = load(modelgen.ssd_tflite(tmp_path / "quant.tflite", quantized=True))
    feed = handler.preprocess(half).feeds["normalized_input_image_tensor"]
    assert feed.dtype == np.uint8
    np.testing.assert_array_equal(feed[0, 5, 5], [0, 255, 0])


def test_tflite_ssd_int8_input_is_shifted_raw_pixels() -> None:
    outputs = (
        TensorSpec("TFLite_Detection_PostProcess", (1, 10, 4), "float32"),
        TensorSpec("TFLite_Detection_PostProcess:1", (1, 10), "float32"),
        TensorSpec("TFLite_Detection_PostProcess:2", (1, 10), "float32"),
        TensorSpec("TFLite_Detection_PostProcess:3", (1,), "float32"),
    )
    signature = Signature("tflite", (TensorSpec("image", (1, 320, 320, 3), "int8"),), outputs)
    handler = choose_handler(signature)
    feed = handler.preprocess(Image.new("RGB", (50, 50), (0, 128, 255))).feeds["image"]
    assert feed.dtype == np.int8 and feed.shape == (1, 320, 320, 3)
    np.testing.assert_array_equal(feed[0, 7, 7], [-128, 0, 127])


def test_tflite_ssd_min_score(tmp_path: Path) -> None:
    runtime, handler = load(modelgen.ssd_tflite(tmp_path / "ssd.tflite"), {"min_score": 0.5})
    assert_detections(detect(runtime, handler, photo(100, 100)), SSD_TRUTH[:2])


# -- YOLOv5 / YOLOv8 ----------------------------------------------------------------------------------


def unletterbox(truth: Sequence[Truth], image: tuple[int, int], size: int = 320) -> list[Truth]:
    """Expected boxes: input pixels -> image-normalised, computed by hand from the geometry."""
    scale = min(size / image[0], size / image[1])
    cw, ch = round(image[0] * scale), round(image[1] * scale)
    left, top = (size - cw) // 2, (size - ch) // 2
    out: list[Truth] = []
    for cls, score, (x0, y0, x1, y1) in truth:
        box = ((x0 - left) / cw, (y0 - top) / ch, (x1 - left) / cw, (y1 - top) / ch)
        out.append((cls, score, tuple(min(1.0, max(0.0, v)) for v in box)))  # type: ignore[misc]
    return out


@pytest.mark.parametrize("build", [modelgen.yolov8_onnx, modelgen.yolov5_onnx], ids=["v8", "v5"])
@pytest.mark.parametrize("size", [(640, 480), (300, 600)], ids=["wide", "tall"])
def test_yolo_decodes_nms_and_unletterboxes(tmp_path: Path, build: Any, size: tuple[int, int]) -> None:
    runtime, handler = load(build(tmp_path / "yolo.onnx"))
    assert handler.name == "yolo" and handler.input_size == (320, 320) and handler.num_classes == 3
    # Planted duplicates are suppressed; the same box with another class survives; on v5 the
    # low-objectness row is dropped (its score is obj * class = 0.03).
    found = detect(runtime, handler, photo(*size))
    assert_detections(found, unletterbox(YOLO_TRUTH, size))


def test_yolo_iou_threshold_option(tmp_path: Path) -> None:
    # The planted duplicates overlap their originals with IoU ~0.90.
    runtime, handler = load(modelgen.yolov8_onnx(tmp_path / "v8.onnx"), {"iou_threshold": 0.95})
    assert len(detect(runtime, handler, photo(640, 480))) == 2 * len(YOLO_TRUTH)


def test_yolo_feed_is_letterboxed_on_114(tmp_path: Path) -> None:
    _, handler = load(modelgen.yolov5_onnx(tmp_path / "v5.onnx"))
    feed = handler.preprocess(Image.new("RGB", (300, 600), (0, 0, 0))).feeds["images"]
    assert feed.shape == (1, 3, 320, 320)
    np.testing.assert_allclose(feed[0, :, :, :80], 114 / 255, atol=1e-6)  # 160 px wide content, centred
    np.testing.assert_allclose(feed[0, :, :, 80:240], 0.0)
    np.testing.assert_allclose(feed[0, :, :, 240:], 114 / 255, atol=1e-6)
