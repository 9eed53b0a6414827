"""Box conversions, NMS variants and the Detection list builder, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.base import Detection
from handlers.boxes import (
    clip01,
    cxcywh_to_xyxy,
    iou_one_to_many,
    nms,
    nms_per_class,
    to_detections,
    weighted_nms,
    xyxy_to_yxyx,
    yxyx_to_xyxy,
)

A = [0.0, 0.0, 10.0, 10.0]
B = [1.0, 1.0, 11.0, 11.0]  # IoU with A = 81 / 119 = 0.6807
C = [20.0, 20.0, 30.0, 30.0]


def test_conversions() -> None:
    yxyx = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(yxyx_to_xyxy(yxyx), [[0.2, 0.1, 0.4, 0.3]])
    np.testing.assert_allclose(xyxy_to_yxyx(yxyx_to_xyxy(yxyx)), yxyx)
    np.testing.assert_allclose(cxcywh_to_xyxy(np.array([[50.0, 40.0, 20.0, 10.0]])), [[40, 35, 60, 45]])
    np.testing.assert_allclose(clip01(np.array([[-0.2, 0.5, 1.3, 1.0]])), [[0.0, 0.5, 1.0, 1.0]])


def test_iou() -> None:
    iou = iou_one_to_many(np.array(A), np.array([A, B, C, [5.0, 5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(iou, [1.0, 81 / 119, 0.0, 0.0])


@pytest.mark.parametrize(("threshold", "kept"), [(0.5, [0, 2]), (0.7, [0, 1, 2])])
def test_nms_suppresses_overlaps_above_the_threshold(threshold: float, kept: list[int]) -> None:
    boxes = np.array([A, B, C])
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, threshold).tolist() == kept


def test_nms_returns_best_first() -> None:
    boxes = np.array([C, A, B])
    scores = np.array([0.3, 0.6, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [2, 0]


def test_nms_per_class_keeps_overlapping_boxes_of_other_classes() -> None:
    boxes = np.array([A, B, A])
    scores = np.array([0.9, 0.8, 0.7])
    classes = np.array([0, 0, 3])
    assert nms_per_class(boxes, scores, classes, 0.5).tolist() == [0, 2]
    assert nms_per_class(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).tolist() == []


def test_weighted_nms_blends_a_cluster_and_keeps_the_top_score() -> None:
    boxes = np.array([B, A, C], np.float32)
    scores = np.array([0.6, 0.9, 0.5], np.float32)
    out, out_scores = weighted_nms(boxes, scores, 0.3)
    # (0.9 * A + 0.6 * B) / 1.5
    np.testing.assert_allclose(out, [[0.4, 0.4, 10.4, 10.4], C], rtol=1e-6)
    np.testing.assert_allclose(out_scores, [0.9, 0.5])


def test_weighted_nms_needs_overlap_strictly_above_the_threshold() -> None:
    boxes = np.array([A, B], np.float32)
    scores = np.array([0.9, 0.6], np.float32)
    out, _ = weighted_nms(boxes, scores, 81 / 119 + 1e-6)
    np.testing.assert_allclose(out, [A, B])
    empty, empty_scores = weighted_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.3)
    assert empty.shape == (0, 4) and empty_scores.shape == (0,)


def test_to_detections_clips_and_sorts() -> None:
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [-0.5, 0.5, 1.5, 0.9]])
    dets = to_detections(boxes, np.array([0.3, 0.8]), np.array([4, 7]))
    assert dets == [
        Detection(7, pytest.approx(0.8), (0.0, 0.5, 1.0, pytest.approx(0.9))),  # type: ignore[arg-type]
        Detection(4, pytest.approx(0.3), pytest.approx((0.1, 0.1, 0.2, 0.2))),  # type: ignore[arg-type]
    ]
    assert all(isinstance(d.class_id, int) and isinstance(d.score, float) for d in dets)
    assert to_detections(np.zeros((0, 4)), np.zeros(0), 0) == []
