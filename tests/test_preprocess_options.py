"""The preprocessing options every family shares (pixel_format, layout, mean/std, pad_value, resize,
pad_position) and the yolo family's nms, observed where a user would notice them: in what the model
receives (``modelgen.probe_onnx`` reports statistics of its input as detection scores) and in where
the boxes land on the original image. Also: boxes with no area left after clipping are dropped."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import pytest
from modelgen import PROBE_FEATURES, SSD_TRUTH, Truth
from PIL import Image

from handlers import Detection, Handler, choose_handler
from handlers.base import HandlerMismatch
from handlers.boxes import to_detections
from handlers.runtimes import Runtime, open_runtime
from supervisor.serving.loader import load_and_warm

COLOUR = (200, 50, 10)


def load(path: Path, options: Mapping[str, Any] | None = None) -> tuple[Runtime, Handler]:
    runtime = open_runtime(path)
    return runtime, choose_handler(runtime.signature, options=options)


def detect(runtime: Runtime, handler: Handler, image: Image.Image) -> list[Detection]:
    prepared = handler.preprocess(image)
    return handler.postprocess(runtime.run(prepared.feeds), prepared)


def probe(tmp_path: Path, image: tuple[int, int] = (64, 32), layout: str = "NCHW", **options: Any) -> dict[str, float]:
    """The probe model's statistics of its input tensor, by name, for a solid ``COLOUR`` image."""
    path = tmp_path / f"probe-{layout}.onnx"
    if not path.exists():
        modelgen.probe_onnx(path, layout=layout)
    runtime, handler = load(path, {"min_score": 0.0, **options})
    found = detect(runtime, handler, Image.new("RGB", image, COLOUR))
    return {PROBE_FEATURES[d.class_id]: d.score for d in found}


def approx(values: Mapping[str, float], **expected: float) -> None:
    # float32 means over 4096 values, summed in the runtime's own order.
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4), (name, values)


# -- what the model receives ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_pixel_format_orders_the_channels(tmp_path: Path, layout: str) -> None:
    # A 64x64 image fills the 64x64 input: no letterbox band in the means.
    rgb = probe(tmp_path, (64, 64), layout)
    approx(rgb, mean0=200 / 255, mean1=50 / 255, mean2=10 / 255)
    approx(probe(tmp_path, (64, 64), layout, pixel_format="bgr"), mean0=10 / 255, mean1=50 / 255, mean2=200 / 255)
    assert probe(tmp_path, (64, 64), layout, pixel_format="rgb") == rgb


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_mean_and_std_are_in_pixel_units_per_channel(tmp_path: Path, layout: str) -> None:
    """tensor = (pixel - mean) / std, replacing the family's /255; after pixel_format."""
    approx(probe(tmp_path, (64, 64), layout, mean=[100, 20, 5], std=[50, 30, 2.5]),
           mean0=(200 - 100) / 50, mean1=(50 - 20) / 30, mean2=(10 - 5) / 2.5)
    approx(probe(tmp_path, (64, 64), layout, mean=[5, 20, 100], std=[2.5, 30, 50], pixel_format="bgr"),
           mean0=(10 - 5) / 2.5, mean1=(50 - 20) / 30, mean2=(200 - 100) / 50)
    # The letterbox band is the pad pixel through the same per-channel mean/std.
    approx(probe(tmp_path, (64, 32), layout, mean=[100, 20, 5], std=[50, 30, 2.5]),
           top0=((114 - 100) / 50 + (200 - 100) / 50) / 2, mean2=((114 - 5) / 2.5 + (10 - 5) / 2.5) / 2)
    # Only one given: the other is 0 (mean) or 1 (std); one number means every channel.
    approx(probe(tmp_path, (64, 64), layout, mean=[0, 0, 5]), mean0=200, mean1=50, mean2=5)
    approx(probe(tmp_path, (64, 64), layout, std=100), mean0=2.0, mean1=0.5, mean2=0.1)


def test_pad_value_and_pad_position(tmp_path: Path) -> None:
    """A 64x32 image in the 64x64 input: 32 rows of padding, split 16/16 (centre) or all below."""
    # Centre, Ultralytics' 114: the top half is 16 rows of band and 16 of image.
    approx(probe(tmp_path), top0=(114 + 200) / 2 / 255, left0=(114 + 200) / 2 / 255)
    approx(probe(tmp_path, pad_value=0), top0=200 / 2 / 255)
    # Bottom-right: the image in the top-left corner, so the top half is all image.
    approx(probe(tmp_path, pad_position="bottom-right"), top0=200 / 255, mean0=(114 + 200) / 2 / 255)
    approx(probe(tmp_path, pad_position="center"), top0=(114 + 200) / 2 / 255)
    # A tall image pads left and right: the left half shows the position the same way.
    approx(probe(tmp_path, (32, 64)), left0=(114 + 200) / 2 / 255, top0=(114 + 200) / 2 / 255)
    approx(probe(tmp_path, (32, 64), pad_position="bottom-right"), left0=200 / 255)
    # Stretch: no band at all.
    approx(probe(tmp_path, resize="stretch"), top0=200 / 255, mean0=200 / 255)


def test_layout_is_read_from_the_shape_and_an_option_against_it_refused(tmp_path: Path) -> None:
    nhwc = modelgen.probe_onnx(tmp_path / "nhwc.onnx", layout="NHWC")
    assert load(nhwc)[1].preprocess(Image.new("RGB", (10, 10))).feeds["images"].shape == (1, 64, 64, 3)
    assert load(nhwc, {"layout": "nhwc"})[1].preprocess(Image.new("RGB", (10, 10))).feeds["images"].shape[3] == 3
    with pytest.raises(HandlerMismatch, match=r"layout is 'nchw' but the model input images\[1, 64, 64, 3\] is nhwc"):
        load(nhwc, {"layout": "nchw"})


def test_options_in_model_json_reach_the_served_model(tmp_path: Path) -> None:
    modelgen.probe_onnx(tmp_path / "model.onnx")
    (tmp_path / "model.json").write_text(json.dumps(
        {"handler_options": {"min_score": 0.0, "pixel_format": "bgr", "pad_value": 0}}))
    model = load_and_warm(tmp_path, 0.0)
    prepared = model.handler.preprocess(Image.new("RGB", (64, 32), COLOUR))
    found = model.handler.postprocess(model.runtime.run(prepared.feeds), prepared)
    got = {PROBE_FEATURES[d.class_id]: d.score for d in found}
    approx(got, mean0=10 / 2 / 255, mean2=200 / 2 / 255)


def test_float_ssd_and_yolov3_take_the_shared_options(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 30), COLOUR)
    _, ssd = load(modelgen.ssd_tflite(tmp_path / "f.tflite"), {"pixel_format": "bgr", "mean": 127.5, "std": 127.5})
    np.testing.assert_allclose(ssd.preprocess(image).feeds["normalized_input_image_tensor"][0, 5, 5],
                               [(c - 127.5) / 127.5 for c in COLOUR[::-1]], atol=1e-6)
    with pytest.raises(HandlerMismatch, match="give input_range or mean/std, not both"):
        load(modelgen.ssd_tflite(tmp_path / "f.tflite"), {"input_range": [0, 1], "mean": 0})
    # Raw-pixel inputs: their quantization maps the pixels; a mean/std there is refused, not ignored.
    with pytest.raises(HandlerMismatch, match="mean/std apply to float inputs; this model takes uint8"):
        load(modelgen.ssd_mobilenet_onnx(tmp_path / "ssd.onnx"), {"std": 255})
    _, v3 = load(modelgen.tiny_yolov3_onnx(tmp_path / "v3.onnx"), {"pixel_format": "bgr", "pad_value": 0})
    feed = v3.preprocess(Image.new("RGB", (416, 208), COLOUR)).feeds["input_1"]
    np.testing.assert_allclose(feed[0, :, 200, 5], [c / 255 for c in COLOUR[::-1]], atol=1e-6)
    np.testing.assert_allclose(feed[0, :, 0, 0], 0.0)


def test_the_older_yolo_layout_option_still_names_the_output_layout(tmp_path: Path) -> None:
    """"layout": "v5"/"v8" in installed manifests meant the output layout; they keep loading."""
    runtime, handler = load(modelgen.yolov5_onnx(tmp_path / "v5.onnx"), {"layout": "v5"})
    assert handler.options.output_layout == "v5" and handler.options.layout is None  # type: ignore[attr-defined]
    assert len(detect(runtime, handler, Image.new("RGB", (320, 320)))) == 3


# -- where boxes land -------------------------------------------------------------------------------


def expected_boxes(
    truth: Sequence[Truth], image: tuple[int, int], size: tuple[int, int], resize: str, position: str
) -> list[Truth]:
    """Boxes in input pixels -> normalised to the image, by hand for each resize and pad position."""
    (w, h), (iw, ih) = image, size
    if resize == "stretch":
        cw, ch, left, top = iw, ih, 0, 0
    else:
        scale = min(iw / w, ih / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = ((iw - cw) // 2, (ih - ch) // 2) if position == "centre" else (0, 0)
    out: list[Truth] = []
    for cls, score, (x0, y0, x1, y1) in truth:
        box = [min(1.0, max(0.0, v)) for v in ((x0 - left) / cw, (y0 - top) / ch, (x1 - left) / cw, (y1 - top) / ch)]
        if box[2] > box[0] and box[3] > box[1]:
            out.append((cls, score, tuple(box)))  # type: ignore[arg-type]
    return sorted(out, key=lambda t: -t[1])


def assert_detections(found: list[Detection], expected: Sequence[Truth]) -> None:
    assert [d.class_id for d in found] == [t[0] for t in expected]
    np.testing.assert_allclose([d.score for d in found], [t[1] for t in expected], atol=1e-6)
    np.testing.assert_allclose([d.box for d in found], [t[2] for t in expected], atol=1e-5)


# In input pixels of 320x320: the first two lie in bands that some geometries leave empty.
BAND_TRUTH: list[Truth] = [
    (0, 0.9, (20.0, 5.0, 100.0, 30.0)),  # top rows: padding when centred on a wide image
    (1, 0.8, (250.0, 280.0, 310.0, 315.0)),  # bottom-right corner: padding when the image is top-left
    (2, 0.7, (100.0, 100.0, 220.0, 200.0)),  # the middle: always on the image
]


WIDE, TALL, VERY_WIDE = (640, 480), (300, 600), (640, 200)


@pytest.mark.parametrize(("resize", "position", "image", "kept"), [
    # Content rows 40..280: the top and the bottom-right boxes lie in the bands.
    ("letterbox", "centre", WIDE, [2]),
    ("letterbox", "centre", VERY_WIDE, [2]),  # rows 110..210
    ("letterbox", "centre", TALL, [0, 2]),  # columns 80..240: the top box keeps x 80..100
    ("letterbox", "bottom-right", WIDE, [0, 2]),  # rows 0..240
    ("letterbox", "bottom-right", VERY_WIDE, [0]),  # rows 0..100: the middle box starts at row 100
    ("letterbox", "bottom-right", TALL, [0, 2]),  # columns 0..160
    ("stretch", "centre", WIDE, [0, 1, 2]),
    ("stretch", "bottom-right", TALL, [0, 1, 2]),  # no band to place
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_boxes_map_back_to_the_image_for_each_geometry(
    tmp_path: Path, resize: str, position: str, image: tuple[int, int], kept: list[int]
) -> None:
    runtime, handler = load(modelgen.yolov8_onnx(tmp_path / "m.onnx", BAND_TRUTH),
                            {"resize": resize, "pad_position": position})
    found = detect(runtime, handler, Image.new("RGB", image))
    # A box with no area left on the image is dropped, whatever its score.
    assert [d.class_id for d in found] == kept
    assert_detections(found, expected_boxes(BAND_TRUTH, image, (320, 320), resize, position))


def test_a_letterboxed_ssd_maps_its_normalised_boxes_back(tmp_path: Path) -> None:
    """SSD boxes are normalised to the input: stretched (the default) that is the image; letterboxed
    on request they go back through the letterbox."""
    runtime, handler = load(modelgen.ssd_tflite(tmp_path / "ssd.tflite"),
                            {"resize": "letterbox", "pad_position": "bottom-right"})
    in_pixels = [(c, s, tuple(v * 300 for v in box)) for c, s, box in SSD_TRUTH]
    found = detect(runtime, handler, Image.new("RGB", (600, 400)))
    assert_detections(found, expected_boxes(in_pixels, (600, 400), (300, 300), "letterbox",  # type: ignore[arg-type]
                                            "bottom-right"))


def test_boxes_without_area_after_clipping_are_dropped() -> None:
    boxes = np.array([
        [0.2, 0.2, 0.4, 0.4],  # fine
        [-0.5, 0.1, -0.1, 0.3],  # left of the image: zero width once clipped
        [0.3, 1.2, 0.6, 1.5],  # below it
        [0.5, 0.5, 0.5, 0.9],  # zero width as given
        [0.6, 0.6, 0.4, 0.8],  # inverted
        [np.nan, 0.1, 0.2, 0.3],  # not a number
        [0.9, 0.9, 1.4, 1.3],  # partly outside: clipped, kept
    ], np.float32)
    scores = np.linspace(0.9, 0.3, len(boxes)).astype(np.float32)
    found = to_detections(boxes, scores, np.arange(len(boxes)))
    assert [d.class_id for d in found] == [0, 6]
    np.testing.assert_allclose(found[1].box, [0.9, 0.9, 1.0, 1.0], atol=1e-6)


# -- NMS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nms", "kept"), [
    # YOLO_TRUTH: classes 2 and 1 share a box; each true box has a shifted 0.9x duplicate (IoU ~0.9).
    (None, [0, 2, 1]),  # default per-class: the duplicates go, the shared box stays once per class
    ("per-class", [0, 2, 1]),
    ("agnostic", [0, 2]),  # the shared box: the best class wins
    ("none", [0, 0, 2, 2, 1, 1]),  # nothing merged: every candidate with its duplicate
])
def test_nms_per_class_agnostic_or_none(tmp_path: Path, nms: str | None, kept: list[int]) -> None:
    options = {} if nms is None else {"nms": nms}
    runtime, handler = load(modelgen.yolov8_onnx(tmp_path / "v8.onnx"), options)
    found = detect(runtime, handler, Image.new("RGB", (320, 320)))
    assert [d.class_id for d in found] == kept


def test_nms_on_an_end2end_output_only_when_asked(tmp_path: Path) -> None:
    rows = [(40, 60, 120, 200, 0.9, 0), (42, 61, 121, 202, 0.8, 1), (150, 100, 300, 180, 0.7, 2)]
    path = modelgen.end2end_onnx(tmp_path / "e2e.onnx", rows, metadata=modelgen.ultralytics_metadata())
    assert [d.class_id for d in detect(*load(path), Image.new("RGB", (320, 320)))] == [0, 1, 2]
    assert [d.class_id for d in detect(*load(path, {"nms": "per-class"}), Image.new("RGB", (320, 320)))] == [0, 1, 2]
    assert [d.class_id for d in detect(*load(path, {"nms": "agnostic"}), Image.new("RGB", (320, 320)))] == [0, 2]


def test_nms_is_refused_where_the_model_does_its_own(tmp_path: Path) -> None:
    """SSD post-process ops and the YOLOv3 zoo graph run NMS themselves: no such option there."""
    from pydantic import ValidationError

    from handlers.tflite_ssd import TfliteSsd

    with pytest.raises(ValidationError, match="nms"):
        TfliteSsd.parse_options({"nms": "agnostic"})
