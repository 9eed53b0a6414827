"""The MediaPipe family decodes as MediaPipe 0.10.14 does, on its real models and public-domain photos.

The goldens (tests/data/mediapipe/golden.json) are MediaPipe's own calculators' output, made by
scripts/vendor_golden.py in an environment with MediaPipe installed; these tests need none.

- "exact" scenes give the model the same input tensor on both sides (no resampling), so what is
  compared is the decoding: anchors, box and keypoint scaling, sigmoid and clipping, score cut,
  weighted NMS blending boxes and keypoints, undoing the letterbox. The tolerances are float
  rounding: IoU >= 0.9999, scores within 1e-5, keypoints within 0.01 px.
- "photo" scenes are full-size photos: MediaPipe resamples with OpenCV's warp (no antialiasing),
  this project with Pillow's antialiased resize, so the models see slightly different pixels;
  detections agree approximately.
- "-low" cases lower the score threshold to 0.05: dozens of candidates, real NMS clusters, and
  palm detections (none of these photos shows a hand that the palm models are sure of).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scenes
import vendor_compare
from vendor_compare import compare, golden, model_path

from handlers.anchors import SsdAnchorOptions, ssd_anchors
from handlers.mediapipe_ssd import KNOWN_MODELS, MediapipeSsd, known_model
from handlers.runtimes import open_runtime

CASES: list[dict[str, Any]] = golden()["cases"]
EXACT = [c for c in CASES if c["kind"] == "exact"]
PHOTO = [c for c in CASES if c["kind"] == "photo"]


def case_id(case: dict[str, Any]) -> str:
    low = "" if case["min_score"] is None else "-low"
    return f"{case['model'].removesuffix('.tflite')}:{case['scene']}{low}"


@pytest.mark.parametrize("name", list(golden()["models"]))
def test_the_models_are_the_ones_the_goldens_were_made_with(name: str) -> None:
    assert vendor_compare.sha256_file(model_path(name)) == golden()["models"][name]["sha256"]


def test_every_model_is_recognised_and_decoded_as_its_mediapipe_graph_says() -> None:
    titles = set()
    for name, entry in golden()["models"].items():
        signature = open_runtime(model_path(name)).signature
        known = known_model(signature)
        assert known is not None and MediapipeSsd.matches(signature), name
        titles.add(known.title)
        options = entry.get("mediapipe_options")
        if options is None:  # no graph in MediaPipe 0.10.14 (back camera, dense full range)
            continue
        anchors = {k: v for k, v in options["anchors"].items() if not k.startswith("input_size")}
        assert SsdAnchorOptions(**anchors).model_dump() == known.anchors.model_dump()
        assert known.min_score == options["decoder"]["min_score_thresh"]
        rng = options["image_to_tensor"]["output_tensor_float_range"]
        assert known.input_range == (rng["min"], rng["max"])
        size = (known.input_size, known.input_size)
        assert options["decoder"]["num_boxes"] == known.num_anchors == len(ssd_anchors(known.anchors, size))
        assert options["decoder"]["num_keypoints"] == known.num_keypoints
        assert options["nms"] == {"min_suppression_threshold": 0.3, "overlap_type": "INTERSECTION_OVER_UNION",
                                  "algorithm": "WEIGHTED"}
    assert titles == {k.title for k in KNOWN_MODELS}


@pytest.mark.parametrize("case", EXACT, ids=[case_id(c) for c in EXACT])
def test_decoding_matches_mediapipe_exactly(case: dict[str, Any]) -> None:
    result = compare(case)
    assert result.ours == result.vendor
    assert min(result.ious, default=1.0) >= 0.9999
    assert max(result.score_diffs, default=0.0) <= 1e-5
    assert max(result.corner_px, default=0.0) <= 0.01
    assert max(result.keypoint_px, default=0.0) <= 0.01


@pytest.mark.parametrize("case", PHOTO, ids=[case_id(c) for c in PHOTO])
def test_photos_agree_with_mediapipe_despite_another_resampling(case: dict[str, Any]) -> None:
    result = compare(case)
    threshold = vendor_compare.handler(case["model"], None).min_score
    # A detection one side has and the other lacks sits near the score threshold. The widest swing
    # seen: the mirrored astronaut's pose, 0.70 here and under 0.5 for MediaPipe (both find it at
    # 0.8 in the exact scene).
    assert all(score < threshold + 0.25 for score in result.unpaired_scores), result
    assert abs(result.ours - result.vendor) <= 2
    assert min(result.ious, default=1.0) >= 0.75
    assert max(result.score_diffs, default=0.0) <= 0.1
    # Keypoints (pose's "size/rotation" points lie far from the body) within 30 % of the box size.
    for detection, kp in zip(case["detections"], result.keypoint_px, strict=False):
        w, h = case["image"]["width"], case["image"]["height"]
        box = np.asarray(detection["box"]) * np.array([w, h, w, h])
        assert kp <= 0.3 * max(box[2] - box[0], box[3] - box[1])


@pytest.mark.parametrize("kind", ["exact", "photo"])
def test_scenes_are_the_pixels_the_goldens_were_made_from(kind: str) -> None:
    for case in CASES:
        if case["kind"] == kind:
            size = golden()["models"][case["model"]]["input_size"]
            assert scenes.sha256(scenes.scene(kind, case["scene"], size)) == case["image"]["sha256"]
