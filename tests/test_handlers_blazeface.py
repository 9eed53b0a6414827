"""BlazeFace with the real MediaPipe models: anchors, decoding against MediaPipe's own output, photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from handlers import Handler, choose_handler
from handlers.anchors import SsdAnchorOptions, ssd_anchors
from handlers.base import Detection, Prepared
from handlers.imaging import letterbox_geometry
from handlers.runtimes import Runtime, open_runtime

ROOT = Path(__file__).resolve().parent.parent
SHORT_RANGE = ROOT / "supervisor/bundled/blazeface-short-range/face_detection_short_range.tflite"
FULL_RANGE = ROOT / "tests/data/face_detection_full_range.tflite"

# What mediapipe 0.10.21 itself returns (mp.solutions.face_detection, model_selection=0, default
# min_detection_confidence 0.5) for skimage's astronaut and two padded versions of it:
# (score, xmin, ymin, xmax, ymax), normalised to each image.
MEDIAPIPE_SHORT = {
    "astronaut": (0.9217386841773987, 0.34680745005607605, 0.16185776889324188, 0.5330263376235962, 0.3480769693851471),
    "wide": (0.8858472108840942, 0.40757960081100464, 0.15640228986740112, 0.5511599779129028, 0.344851553440094),
    "tall": (0.6955481171607971, 0.3380190134048462, 0.16568569839000702, 0.5351846218109131, 0.29816460609436035),
}


def astronaut(variant: str = "astronaut") -> np.ndarray:
    a = data.astronaut()
    if variant == "wide":  # 672x512: letterboxed top and bottom
        return np.pad(a, ((0, 0), (100, 60), (0, 0)))
    if variant == "tall":  # 512x762: letterboxed left and right
        return np.pad(a, ((50, 200), (0, 0), (0, 0)))
    return a


@pytest.fixture(scope="module")
def short_range() -> tuple[Runtime, Handler]:
    runtime = open_runtime(SHORT_RANGE)
    return runtime, choose_handler(runtime.signature)


@pytest.fixture(scope="module")
def full_range() -> tuple[Runtime, Handler]:
    runtime = open_runtime(FULL_RANGE)
    return runtime, choose_handler(runtime.signature)


def detect(model: tuple[Runtime, Handler], pixels: np.ndarray) -> list[Detection]:
    runtime, handler = model
    prepared = handler.preprocess(Image.fromarray(pixels))
    return handler.postprocess(runtime.run(prepared.feeds), prepared)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ssd_anchor_centers(size: int, strides: tuple[int, ...], interpolated: float) -> np.ndarray:
    options = SsdAnchorOptions(min_scale=0.1484375, max_scale=0.75, strides=strides,
                               interpolated_scale_aspect_ratio=interpolated, fixed_anchor_size=True)
    anchors = ssd_anchors(options, (size, size))
    np.testing.assert_array_equal(anchors[:, 2:], 1.0)  # fixed_anchor_size
    return anchors[:, :2]


def test_anchor_layout_matches_the_ssd_anchors_calculator() -> None:
    short = ssd_anchor_centers(128, (8, 16, 16, 16), 1.0)
    assert short.shape == (896, 2)
    # Layer 0: 16x16 cells, 2 anchors each (aspect 1.0 + interpolated), row-major from the corner.
    np.testing.assert_allclose(short[:4], [[1 / 32, 1 / 32]] * 2 + [[3 / 32, 1 / 32]] * 2)
    # Layers 1-3 share stride 16: one 8x8 map with 3 x 2 = 6 anchors per cell.
    np.testing.assert_allclose(short[512:519], [[1 / 16, 1 / 16]] * 6 + [[3 / 16, 1 / 16]])
    np.testing.assert_allclose(short[-1], [15 / 16, 15 / 16])
    full = ssd_anchor_centers(192, (4,), 0.0)
    assert full.shape == (2304, 2)  # 48x48 cells, one anchor each
    corners = [[1 / 96, 1 / 96], [3 / 96, 1 / 96], [1 / 96, 3 / 96], [95 / 96, 95 / 96]]
    np.testing.assert_allclose(full[[0, 1, 48, -1]], corners)


def test_handler_properties(short_range: tuple[Runtime, Handler], full_range: tuple[Runtime, Handler]) -> None:
    assert short_range[1].input_size == (128, 128) and full_range[1].input_size == (192, 192)
    assert short_range[1].num_classes == full_range[1].num_classes == 1
    assert short_range[1].min_score == 0.5 and full_range[1].min_score == 0.6  # MediaPipe's thresholds


def test_preprocess_is_mediapipes_letterbox(short_range: tuple[Runtime, Handler]) -> None:
    # keep_aspect_ratio with BORDER_ZERO: black bands, values in [-1, 1].
    prepared = short_range[1].preprocess(Image.new("RGB", (200, 100), (255, 255, 255)))
    feed = prepared.feeds["input"]
    assert feed.shape == (1, 128, 128, 3) and feed.dtype == np.float32
    np.testing.assert_allclose(feed[0, 32:96], 1.0, atol=1e-6)
    np.testing.assert_allclose(feed[0, :32], -1.0)
    np.testing.assert_allclose(feed[0, 96:], -1.0)


def test_decoding_reproduces_mediapipe_exactly(short_range: tuple[Runtime, Handler]) -> None:
    # For a 512x512 image MediaPipe's OpenCV warp samples every 4th pixel exactly; feeding that
    # same tensor isolates decoding, weighted NMS and projection from resampling differences.
    runtime, handler = short_range
    tensor = data.astronaut()[::4, ::4].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    prepared = Prepared({"input": tensor[None]}, (512, 512), {"letterbox": letterbox_geometry((512, 512), (128, 128))})
    (face,) = handler.postprocess(runtime.run(prepared.feeds), prepared)
    assert face.class_id == 0
    np.testing.assert_allclose((face.score, *face.box), MEDIAPIPE_SHORT["astronaut"], atol=1e-5)


@pytest.mark.parametrize("variant", ["astronaut", "wide", "tall"])
def test_one_face_where_mediapipe_finds_it(short_range: tuple[Runtime, Handler], variant: str) -> None:
    # End to end with our (bilinear, antialiased) resize: close to MediaPipe, letterbox undone.
    (face,) = detect(short_range, astronaut(variant))
    expected = MEDIAPIPE_SHORT[variant]
    assert face.score == pytest.approx(expected[0], abs=0.03)
    np.testing.assert_allclose(face.box, expected[1:], atol=0.015)


def test_astronaut_face_box_is_tight(short_range: tuple[Runtime, Handler]) -> None:
    (face,) = detect(short_range, astronaut())
    assert face.score > 0.8
    x0, y0, x1, y1 = (v * 512 for v in face.box)
    # Checked by eye on a crop: brow to chin, cheek to cheek.
    assert 170 < x0 < 185 and 265 < x1 < 280
    assert 70 < y0 < 90 and 165 < y1 < 185


def test_full_range_finds_the_same_face(
    short_range: tuple[Runtime, Handler], full_range: tuple[Runtime, Handler]
) -> None:
    (near,) = detect(short_range, astronaut())
    (far,) = detect(full_range, astronaut())
    assert far.score > 0.8
    assert iou(near.box, far.box) > 0.75


@pytest.mark.parametrize("model_name", ["short", "full"])
@pytest.mark.parametrize("scene", ["coffee", "gray"])
def test_no_face_no_detection(
    short_range: tuple[Runtime, Handler], full_range: tuple[Runtime, Handler], model_name: str, scene: str
) -> None:
    pixels = data.coffee() if scene == "coffee" else np.full((300, 400, 3), 128, np.uint8)
    assert detect(short_range if model_name == "short" else full_range, pixels) == []


def test_lower_min_score_option_admits_more_candidates() -> None:
    runtime = open_runtime(SHORT_RANGE)
    strict = choose_handler(runtime.signature)
    loose = choose_handler(runtime.signature, options={"min_score": 0.01})
    image = Image.fromarray(data.coffee())
    prepared = strict.preprocess(image)
    outputs = runtime.run(prepared.feeds)
    found = loose.postprocess(outputs, prepared)
    assert strict.postprocess(outputs, prepared) == [] and len(found) > 0
    assert all(0.01 <= d.score < 0.5 for d in found)
