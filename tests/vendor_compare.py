"""This project's MediaPipe decoding against MediaPipe's own results (tests/data/mediapipe/golden.json).

Used by tests/test_mediapipe_conformance.py; run it to print the agreement figures:

    python tests/vendor_compare.py

For each golden case (a model, a scene, a score threshold) the scene is run through this project's
handler and its detections are paired with MediaPipe's by IoU. Keypoint and corner errors are in
pixels of the scene image.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenes

from handlers import Handler, choose_handler
from handlers.base import Detection
from handlers.runtimes import Runtime, open_runtime

REPO = Path(__file__).resolve().parent.parent
GOLDEN_PATH = REPO / "tests" / "data" / "mediapipe" / "golden.json"
# Where each model of the goldens lies in this repository.
MODEL_PATHS = {
    "face_detection_short_range.tflite": REPO / "supervisor/bundled/blazeface-short-range"
    / "face_detection_short_range.tflite",
    "face_detection_full_range.tflite": REPO / "tests/data/face_detection_full_range.tflite",
}

__all__ = ["GOLDEN_PATH", "Agreement", "compare", "golden", "handler", "model_path", "sha256_file"]


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN_PATH.read_text())
    return data


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_path(name: str) -> Path:
    return MODEL_PATHS.get(name, REPO / "tests" / "data" / "mediapipe" / name)


@cache
def _runtime(name: str) -> Runtime:
    return open_runtime(model_path(name))


def handler(name: str, min_score: float | None) -> Handler:
    return choose_handler(_runtime(name).signature, options={} if min_score is None else {"min_score": min_score})


def detect(name: str, pixels: np.ndarray, min_score: float | None = None) -> list[Detection]:
    found_by = handler(name, min_score)
    prepared = found_by.preprocess(Image.fromarray(pixels))
    return found_by.postprocess(_runtime(name).run(prepared.feeds), prepared)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class Agreement:
    """How one case's detections compare: paired by IoU, best vendor detection first."""

    case: dict[str, Any]
    vendor: int
    ours: int
    ious: list[float] = field(default_factory=list)
    score_diffs: list[float] = field(default_factory=list)
    corner_px: list[float] = field(default_factory=list)  # worst box corner per pair
    keypoint_px: list[float] = field(default_factory=list)  # worst keypoint per pair
    unpaired_scores: list[float] = field(default_factory=list)  # of detections one side lacks

    @property
    def label(self) -> str:
        c = self.case
        return f"{c['model']}:{c['kind']}:{c['scene']}:{c['min_score'] or 'default'}"


def compare(case: dict[str, Any]) -> Agreement:
    pixels = scenes.scene(case["kind"], case["scene"], golden()["models"][case["model"]]["input_size"])
    if scenes.sha256(pixels) != case["image"]["sha256"]:
        raise AssertionError(f"{case['scene']}: the scene's pixels are not those the goldens were made from")
    h, w = pixels.shape[:2]
    ours = detect(case["model"], pixels, case["min_score"])
    theirs = case["detections"]
    result = Agreement(case, len(theirs), len(ours))
    # MediaPipe does not clip boxes to the image; this project does (the engine would anyway).
    scale = np.array([w, h, w, h], np.float64)
    free = list(range(len(ours)))
    for t in theirs:
        if not free:
            result.unpaired_scores.append(t["score"])
            continue
        tbox = np.clip(np.asarray(t["box"], np.float64), 0.0, 1.0)
        best = max(free, key=lambda i: _iou(tbox, np.asarray(ours[i].box)))
        free.remove(best)
        mine = ours[best]
        result.ious.append(_iou(tbox, np.asarray(mine.box)))
        result.score_diffs.append(abs(mine.score - t["score"]))
        result.corner_px.append(float(np.abs((np.asarray(mine.box) - tbox) * scale).max()))
        tk, mk = np.asarray(t["keypoints"], np.float64), np.asarray(mine.keypoints, np.float64)
        if tk.shape != mk.shape:
            result.keypoint_px.append(float("inf"))
        elif tk.size:
            result.keypoint_px.append(float(np.hypot(*((mk - tk) * [w, h]).T).max()))
    result.unpaired_scores += [ours[i].score for i in free]
    return result


def _summary(rows: list[Agreement]) -> str:
    ious = [v for r in rows for v in r.ious]
    scores = [v for r in rows for v in r.score_diffs]
    kps = [v for r in rows for v in r.keypoint_px]
    counts = sum(r.vendor == r.ours for r in rows)
    if not ious:
        return f"cases {len(rows):3}  same count {counts}/{len(rows)}  (no detections)"
    return (f"cases {len(rows):3}  same count {counts}/{len(rows)}  pairs {len(ious):3}  "
            f"IoU mean {np.mean(ious):.5f} min {np.min(ious):.5f}  score diff max {np.max(scores):.2e}  "
            f"keypoint err max {max(kps) if kps else 0:.3f} px")


def main() -> int:
    by_group: dict[tuple[str, str], list[Agreement]] = {}
    for case in golden()["cases"]:
        kind = case["kind"] + ("" if case["min_score"] is None else "-low")
        by_group.setdefault((case["model"], kind), []).append(compare(case))
    print(f"against {golden()['vendor']} ({GOLDEN_PATH.relative_to(REPO)})")
    for (model, kind), rows in by_group.items():
        print(f"{model:42} {kind:10} {_summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
