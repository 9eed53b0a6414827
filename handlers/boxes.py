"""Box arithmetic shared by the families: conversions, clipping, NMS, MediaPipe blending.

All functions take and return numpy arrays of shape (N, 4) and are vectorised over N; the
NMS loops run once per *kept* box, each iteration a vectorised IoU against the rest.
"""

from __future__ import annotations

import numpy as np

from handlers.base import Detection

__all__ = [
    "clip01",
    "cxcywh_to_xyxy",
    "iou_one_to_many",
    "nms",
    "nms_per_class",
    "to_detections",
    "weighted_nms",
    "xyxy_to_yxyx",
    "yxyx_to_xyxy",
]


def yxyx_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) -> (xmin, ymin, xmax, ymax); a new array."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


# Swapping the axes is its own inverse.
xyxy_to_yxyx = yxyx_to_xyxy


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(x_center, y_center, width, height) -> (xmin, ymin, xmax, ymax)."""
    b = np.asarray(boxes)
    half = b[..., 2:4] * 0.5
    return np.concatenate((b[..., 0:2] - half, b[..., 0:2] + half), axis=-1)


def clip01(boxes: np.ndarray) -> np.ndarray:
    """Normalised boxes clipped to the image (a new array)."""
    return np.clip(boxes, 0.0, 1.0)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes``; 0 where the union is empty."""
    ix = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    iy = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(ix, 0.0, None) * np.clip(iy, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _by_score(scores: np.ndarray) -> np.ndarray:
    # Stable, so equal scores keep the model's order and results are reproducible.
    return np.argsort(-scores, kind="stable")


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, best first. Suppresses IoU > ``iou_threshold``."""
    order = _by_score(scores)
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou_one_to_many(boxes[best], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def nms_per_class(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Class-wise NMS in one pass: boxes of different classes are shifted apart so they
    never overlap (the torchvision ``batched_nms`` trick)."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.intp)
    span = float(boxes.max() - boxes.min()) + 1.0
    shifted = boxes + (classes.astype(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def weighted_nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's WEIGHTED non-max suppression (NonMaxSuppressionCalculator).

    Take the best remaining box; every remaining box whose IoU with it is *above* the
    threshold (itself included) joins its cluster; the output box is the score-weighted mean
    of the cluster's corners and keeps the best box's score. Returns (boxes, scores), best first.
    Rows may carry more values after the four corners (keypoints): they are blended the same way.
    """
    order = _by_score(scores)
    out_boxes: list[np.ndarray] = []
    out_scores: list[float] = []
    while order.size:
        best = int(order[0])
        overlap = iou_one_to_many(boxes[best], boxes[order]) > iou_threshold
        members = order[overlap]
        if members.size == 0:
            # A degenerate (zero-area) best box overlaps nothing, not even itself; MediaPipe
            # stops there, since the remaining set would never shrink.
            out_boxes.append(boxes[best])
            out_scores.append(float(scores[best]))
            break
        weights = scores[members]
        out_boxes.append((boxes[members] * weights[:, None]).sum(axis=0) / weights.sum())
        out_scores.append(float(scores[best]))
        order = order[~overlap]
    if not out_boxes:
        return np.zeros((0, boxes.shape[1]), dtype=boxes.dtype), np.zeros(0, dtype=scores.dtype)
    return np.stack(out_boxes), np.asarray(out_scores, dtype=scores.dtype)


def to_detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | int, keypoints: np.ndarray | None = None
) -> list[Detection]:
    """Normalised xyxy boxes -> clipped ``Detection`` list sorted best first. ``keypoints`` (N, K, 2),
    normalised x/y, are kept as they are (not clipped).

    Boxes with no area left after clipping (one lying wholly in the letterbox padding or outside
    the image, an inverted or non-finite one) are dropped: they show nothing."""
    if len(scores) == 0:
        return []
    rows = clip01(np.asarray(boxes, dtype=np.float64)).tolist()
    scores = np.asarray(scores)
    ids = np.broadcast_to(np.asarray(classes), scores.shape).tolist()
    values = scores.tolist()
    points: list[tuple[tuple[float, float], ...]] = [()] * len(values) if keypoints is None else [
        tuple((p[0], p[1]) for p in row) for row in np.asarray(keypoints, dtype=np.float64).tolist()
    ]
    # Plain floats from here: for the handful of boxes a request returns, cheaper than numpy per item.
    return [
        Detection(int(ids[i]), float(values[i]), (b[0], b[1], b[2], b[3]), points[i])
        for i in _by_score(scores).tolist()
        if (b := rows[i])[2] > b[0] and b[3] > b[1]
    ]
