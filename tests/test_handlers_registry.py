"""choose_handler: exactly one family fits each real signature; unrelated models are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import modelgen
import pytest

from handlers import REGISTRY, choose_handler
from handlers.base import HandlerMismatch, Signature, TensorSpec
from handlers.runtimes import open_runtime

ROOT = Path(__file__).resolve().parent.parent
SHORT_RANGE = ROOT / "supervisor/bundled/blazeface-short-range/face_detection_short_range.tflite"
FULL_RANGE = ROOT / "tests/data/face_detection_full_range.tflite"

BUILDERS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("tiny.onnx", modelgen.tiny_yolov3_onnx, "onnx_yolov3"),
    ("yolov3.onnx", modelgen.yolov3_10_onnx, "onnx_yolov3"),
    ("ssd.onnx", modelgen.ssd_mobilenet_onnx, "onnx_ssd"),
    ("v8.onnx", modelgen.yolov8_onnx, "yolo"),
    ("v5.onnx", modelgen.yolov5_onnx, "yolo"),
    ("ssd.tflite", modelgen.ssd_tflite, "tflite_ssd"),
    ("ssd_q.tflite", lambda p: modelgen.ssd_tflite(p, quantized=True), "tflite_ssd"),
    ("ssd_s.tflite", lambda p: modelgen.ssd_tflite(p, scrambled=True), "tflite_ssd"),
    ("resnet.onnx", lambda p: modelgen.classifier_onnx(p, size=32), "classifier"),
    ("mobilenet_q.tflite", lambda p: modelgen.classifier_tflite(p, size=32, quantized="uint8"), "classifier"),
]


def fitting(signature: Signature) -> list[str]:
    return sorted(name for name, cls in REGISTRY.items() if cls.matches(signature))


def test_all_families_are_registered() -> None:
    assert sorted(REGISTRY) == ["classifier", "mediapipe_ssd", "onnx_ssd", "onnx_yolov3", "tflite_ssd", "yolo"]


def test_blazeface_is_still_a_name_of_the_mediapipe_family() -> None:
    # Installed packages and manifests written before the family was generalised say "blazeface".
    signature = open_runtime(SHORT_RANGE).signature
    assert choose_handler(signature, name="blazeface").name == "mediapipe_ssd"


@pytest.mark.parametrize(("filename", "build", "family"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_exactly_one_family_fits_each_generated_model(
    tmp_path: Path, filename: str, build: Callable[[Path], Path], family: str
) -> None:
    signature = open_runtime(build(tmp_path / filename)).signature
    assert fitting(signature) == [family]
    assert choose_handler(signature).name == family
    assert choose_handler(signature, name=family).name == family


@pytest.mark.parametrize("path", [SHORT_RANGE, FULL_RANGE], ids=["short", "full"])
def test_real_blazeface_models_fit_the_mediapipe_family_only(path: Path) -> None:
    signature = open_runtime(path).signature
    assert fitting(signature) == ["mediapipe_ssd"]


def test_unrelated_model_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    signature = open_runtime(modelgen.unrelated_onnx(tmp_path / "enhancer.onnx")).signature
    with pytest.raises(HandlerMismatch) as info:
        choose_handler(signature)
    message = str(info.value)
    assert "no handler matches" in message
    assert "enhanced[1, 3, 32, 32]" in message  # says what the model looks like
    assert "classifier, mediapipe_ssd, onnx_ssd, onnx_yolov3, tflite_ssd, yolo" in message  # and what to name


def test_named_handler_must_fit_and_exist(tmp_path: Path) -> None:
    signature = open_runtime(modelgen.yolov8_onnx(tmp_path / "v8.onnx")).signature
    with pytest.raises(HandlerMismatch, match="'onnx_ssd' does not fit"):
        choose_handler(signature, name="onnx_ssd")
    with pytest.raises(HandlerMismatch, match="unknown handler 'detr'"):
        choose_handler(signature, name="detr")


def spec(name: str, shape: tuple[int | None, ...], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, shape, dtype)


@pytest.mark.parametrize(
    ("signature", "family"),
    [
        # YOLOv8 export with dynamic axes: the layout is read from the output at run time.
        (Signature("onnx", (spec("images", (1, 3, None, None)),), (spec("output0", (1, None, None)),)), "yolo"),
        # A BlazeFace model whose outputs come in the other order and with other names.
        (
            Signature(
                "tflite",
                (spec("input", (1, 128, 128, 3)),),
                (spec("scores", (1, 896, 1)), spec("boxes", (1, 896, 16))),
            ),
            "mediapipe_ssd",
        ),
        # EfficientDet-Lite style: uint8 input, TF2-scrambled outputs.
        (
            Signature(
                "tflite",
                (spec("serving_default_images:0", (1, 320, 320, 3), "uint8"),),
                (
                    spec("StatefulPartitionedCall:0", (1, 25)),
                    spec("StatefulPartitionedCall:1", (1, 25, 4)),
                    spec("StatefulPartitionedCall:2", (1,)),
                    spec("StatefulPartitionedCall:3", (1, 25)),
                ),
            ),
            "tflite_ssd",
        ),
    ],
    ids=["yolo-dynamic", "blazeface-reordered", "efficientdet-lite"],
)
def test_hand_written_signatures(signature: Signature, family: str) -> None:
    assert fitting(signature) == [family]


@pytest.mark.parametrize(
    "signature",
    [
        # BlazeFace input size with the wrong anchor count.
        Signature("tflite", (spec("input", (1, 128, 128, 3)),), (spec("r", (1, 900, 16)), spec("c", (1, 900, 1)))),
        # An SSD head in ONNX but with a float NCHW input.
        Signature(
            "onnx",
            (spec("x", (1, 3, 300, 300)),),
            (spec("b", (1, 10, 4)), spec("c", (1, 10)), spec("s", (1, 10)), spec("n", (1,))),
        ),
        # A square raw head: neither YOLO layout.
        Signature("onnx", (spec("images", (1, 3, 320, 320)),), (spec("out", (1, 84, 84)),)),
    ],
    ids=["blazeface-anchors", "ssd-nchw", "square-head"],
)
def test_near_misses_fit_nothing(signature: Signature) -> None:
    assert fitting(signature) == []
