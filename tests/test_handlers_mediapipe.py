"""The MediaPipe SSD family beyond its known models: anchors from MediaPipe's options, a model decoded
from handler_options alone, the decoder's options, and refusals that say what to fix.

Decoding of the real models against MediaPipe itself: test_mediapipe_conformance.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from handlers import choose_handler
from handlers.anchors import SsdAnchorOptions, ssd_anchors
from handlers.base import HandlerMismatch, OptionsRejected, Signature, TensorSpec
from handlers.mediapipe_ssd import KNOWN_MODELS, MediapipeSsd
from supervisor.package.manifest import parse_manifest


def test_the_calculators_own_example_gives_tf_ssd_mobilenets_1917_anchors() -> None:
    # The usage example in ssd_anchors_calculator.cc: SSD MobileNet v1 at 300x300.
    options = SsdAnchorOptions(
        num_layers=6, min_scale=0.2, max_scale=0.95, input_size_width=300, input_size_height=300,
        strides=(16, 32, 64, 128, 256, 512), aspect_ratios=(1.0, 2.0, 0.5, 3.0, 0.3333),
        reduce_boxes_in_lowest_layer=True,
    )
    anchors = ssd_anchors(options, (300, 300))
    assert anchors.shape == (1917, 4)  # 19x19x3 + (10x10 + 5x5 + 3x3 + 2x2 + 1x1) x 6
    # First cell: scale 0.1 at 1:1, then the layer's scale 0.2 at 2:1 and 1:2 (w, h = s*sqrt(r), s/sqrt(r)).
    r2 = math.sqrt(2.0)
    np.testing.assert_allclose(anchors[:3], [[0.5 / 19, 0.5 / 19, 0.1, 0.1], [0.5 / 19, 0.5 / 19, 0.2 * r2, 0.2 / r2],
                                             [0.5 / 19, 0.5 / 19, 0.2 / r2, 0.2 * r2]], rtol=1e-6)
    # Second layer: scale 0.35, and the interpolated anchor sqrt(0.35 * 0.5) at 1:1 last.
    second = anchors[19 * 19 * 3 : 19 * 19 * 3 + 6]
    np.testing.assert_allclose(second[0, 2:], [0.35, 0.35], rtol=1e-6)
    np.testing.assert_allclose(second[5, 2:], [math.sqrt(0.35 * 0.5)] * 2, rtol=1e-6)
    np.testing.assert_allclose(second[:, :2], [[0.5 / 10, 0.5 / 10]] * 6, rtol=1e-6)


def test_feature_maps_and_offsets_override_the_strides() -> None:
    options = SsdAnchorOptions(min_scale=0.2, max_scale=0.9, strides=(8, 16), feature_map_width=(3, 2),
                               feature_map_height=(2, 1), anchor_offset_x=0.0, anchor_offset_y=0.0,
                               interpolated_scale_aspect_ratio=0.0, fixed_anchor_size=True)
    anchors = ssd_anchors(options, (64, 64))
    assert anchors.shape == (3 * 2 + 2 * 1, 4)
    np.testing.assert_allclose(anchors[:4, :2], [[0, 0], [1 / 3, 0], [2 / 3, 0], [0, 0.5]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_scale": 0.1, "max_scale": 0.7, "strides": [8, 16], "num_layers": 3}, "num_layers is 3"),
        ({"min_scale": 0.1, "max_scale": 0.7, "strides": [8], "feature_map_width": [4]}, "go together"),
        ({"min_scale": 0.1, "max_scale": 0.7, "strides": []}, "strides"),
        ({"min_scale": 0.1, "strides": [8]}, "max_scale"),
    ],
)
def test_inconsistent_anchor_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SsdAnchorOptions.model_validate(options)


# A MediaPipe-style model MediaPipe does not ship: 64x64 input, one 4x4 layer of 2 anchors per cell
# (32 anchors), 2 keypoints (8 values per anchor).
CUSTOM_ANCHORS = {"num_layers": 1, "min_scale": 0.2, "max_scale": 0.8, "strides": [16], "fixed_anchor_size": True}
CUSTOM = Signature(
    "tflite",
    (TensorSpec("image", (1, 64, 64, 3), "float32"),),
    (TensorSpec("raw", (1, 32, 8), "float32"), TensorSpec("scores", (1, 32, 1), "float32")),
)


def planted(rows: dict[int, tuple[float, list[float]]]) -> dict[str, np.ndarray]:
    """Outputs with the given anchors' (logit, raw values); every other anchor scores nothing."""
    raw = np.zeros((1, 32, 8), np.float32)
    logits = np.full((1, 32, 1), -50.0, np.float32)
    for i, (logit, values) in rows.items():
        logits[0, i, 0] = logit
        raw[0, i] = values
    return {"raw": raw, "scores": logits}


def test_a_model_no_one_knows_is_decoded_from_its_handler_options() -> None:
    with pytest.raises(HandlerMismatch, match="no handler matches"):
        choose_handler(CUSTOM)  # by signature alone, nothing says how to decode it
    with pytest.raises(HandlerMismatch, match=r"handler_options\.anchors"):
        choose_handler(CUSTOM, name="mediapipe_ssd")
    handler = choose_handler(CUSTOM, name="mediapipe_ssd", options={"anchors": CUSTOM_ANCHORS})
    assert isinstance(handler, MediapipeSsd) and handler.num_keypoints == 2 and handler.min_score == 0.5
    # Anchor 17: cell 8 (x 0, y 2) -> centre (0.125, 0.625) of the input. Offsets in input pixels (x_scale
    # = 64): centre +8 px in x, box 32 x 16 px, keypoints at +0/-16 and +16/+16 px from the anchor.
    outputs = planted({17: (2.0, [8.0, 0.0, 32.0, 16.0, 0.0, -16.0, 16.0, 16.0])})
    image = Image.new("RGB", (128, 64))  # letterboxed: content 64x32 at (0, 16) of the input
    prepared = handler.preprocess(image)
    [found] = handler.postprocess(outputs, prepared)
    assert found.score == pytest.approx(1 / (1 + math.exp(-2.0)))
    # In input pixels: centre (16, 40), box x 0..32, y 32..48; keypoints (8, 24) and (24, 56).
    # Letterbox: y - 16, then / (64, 32).
    np.testing.assert_allclose(found.box, [0.0, 0.5, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(found.keypoints, [[0.125, 0.25], [0.375, 1.25]], atol=1e-6)  # not clipped


def test_decoder_options_by_mediapipes_names() -> None:
    values = [8.0, 4.0, math.log(2.0) * 64, 0.0, 0.0, 0.0, 0.0, 0.0]  # y, x, h, w order below
    yxhw = choose_handler(CUSTOM, name="mediapipe_ssd", options={
        "anchors": {**CUSTOM_ANCHORS, "fixed_anchor_size": False}, "box_format": "yxhw",
        "apply_exponential_on_box_size": True, "min_score": 0.1, "input_range": [0, 1]})
    prepared = yxhw.preprocess(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert prepared.feeds["image"].max() == 1.0 and yxhw.min_score == 0.1
    [found] = yxhw.postprocess(planted({0: (0.0, values)}), prepared)
    # Anchor 0: centre (0.125, 0.125), size 0.5 x 0.5 (scale (0.2 + 0.8) / 2 at 1:1, not fixed).
    # y += 8/64 * 0.5, x += 4/64 * 0.5; h = exp(log 2) * 0.5 = 1.0, w = exp(0) * 0.5.
    cx, cy = 0.125 + 4 / 64 * 0.5, 0.125 + 8 / 64 * 0.5
    np.testing.assert_allclose(found.box, [0.0, 0.0, cx + 0.25, cy + 0.5], atol=1e-6)
    assert found.score == pytest.approx(0.5)


@pytest.mark.parametrize("algorithm", ["weighted", "default"])
def test_overlapping_detections_are_blended_or_dropped(algorithm: str) -> None:
    handler = choose_handler(CUSTOM, name="mediapipe_ssd",
                             options={"anchors": CUSTOM_ANCHORS, "nms_algorithm": algorithm})
    # The two anchors of cell 0 predict nearly the same box; their keypoints differ by 8 px.
    box = [0.0, 0.0, 16.0, 16.0]
    outputs = planted({0: (3.0, [*box, 0.0, 0.0, 0.0, 0.0]), 1: (1.0, [*box, 8.0, 8.0, 8.0, 8.0])})
    prepared = handler.preprocess(Image.new("RGB", (64, 64)))
    [found] = handler.postprocess(outputs, prepared)
    s1, s2 = 1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(-1.0))
    assert found.score == pytest.approx(s1)  # the best one's score either way
    shift = (s2 * 8 / (s1 + s2) if algorithm == "weighted" else 0.0) / 64
    np.testing.assert_allclose(found.keypoints, [[0.125 + shift, 0.125 + shift]] * 2, atol=1e-6)


def test_anchor_count_that_does_not_fit_the_model_is_refused() -> None:
    with pytest.raises(HandlerMismatch, match="make 128 anchors but the model has 32"):
        choose_handler(CUSTOM, name="mediapipe_ssd", options={"anchors": {**CUSTOM_ANCHORS, "strides": [8]}})


def test_options_are_checked_by_name_in_model_json() -> None:
    with pytest.raises(OptionsRejected, match="anchor"):
        choose_handler(CUSTOM, name="mediapipe_ssd", options={"anchor": CUSTOM_ANCHORS})
    with pytest.raises(ValueError, match=r"did you mean 'anchors'"):
        parse_manifest({"handler": "mediapipe_ssd", "handler_options": {"anchor": CUSTOM_ANCHORS}})
    with pytest.raises(ValueError, match="min_scale"):
        parse_manifest({"handler": "blazeface", "handler_options": {"anchors": {"strides": [8]}}})
    manifest = parse_manifest({"handler": "blazeface", "handler_options": {"anchors": CUSTOM_ANCHORS}})
    assert manifest.handler == "blazeface"  # the former name still reaches the family


def test_known_models_are_told_apart_by_signature() -> None:
    keys = {(k.input_size, k.num_anchors, k.num_coords) for k in KNOWN_MODELS}
    assert len(keys) == len(KNOWN_MODELS)
    for known in KNOWN_MODELS:
        anchors = ssd_anchors(known.anchors, (known.input_size, known.input_size))
        assert len(anchors) == known.num_anchors


@pytest.mark.parametrize(("options", "found"), [
    ({"min_score": 0.0}, 32),  # every anchor, however low its logit (-50 here)
    ({"min_score": 0.1, "score_clipping_thresh": 1.0}, 32),  # clipped to -1: sigmoid 0.27 passes
    ({"min_score": 0.3, "score_clipping_thresh": 1.0}, 1),
])
def test_score_threshold_and_clipping_decide_as_mediapipe(options: dict, found: int) -> None:
    handler = choose_handler(CUSTOM, name="mediapipe_ssd", options={
        "anchors": CUSTOM_ANCHORS, "nms_algorithm": "default", "min_suppression_threshold": 1.0, **options})
    # Each anchor predicts its own 1x1-pixel box at its centre, so none overlaps another.
    outputs = planted({0: (5.0, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])})
    outputs["raw"][0, :, 2:4] = 1.0
    assert len(handler.postprocess(outputs, handler.preprocess(Image.new("RGB", (64, 64))))) == found
