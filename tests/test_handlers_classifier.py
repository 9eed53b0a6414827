"""Image classifiers: real ONNX and TFLite models whose scores are a known function of the image
(tests/modelgen.py), float and quantized, logits and probabilities, 1000 and 1001 classes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import modelgen
import numpy as np
import pytest
from PIL import Image

from handlers import REGISTRY, choose_handler
from handlers.base import OptionsRejected
from handlers.classifier import ImageClassifier
from handlers.runtimes import Runtime, open_runtime

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
COLOURS = [(200, 30, 90), (10, 240, 20), (128, 128, 255)]


def tf_float(rgb: np.ndarray) -> np.ndarray:
    return rgb / 127.5 - 1.0  # [-1, 1]


def tf_quantized(rgb: np.ndarray) -> np.ndarray:
    return (rgb - 128.0) * 0.0078125  # the model's own input quantization


def imagenet(rgb: np.ndarray) -> np.ndarray:
    return (rgb - IMAGENET_MEAN) / IMAGENET_STD


# name -> (builder, number of classes, the model's view of a pixel colour, score tolerance). Inputs are
# 32x32: a float32 mean over 224x224 pixels is itself off by up to ~1e-3 (the runtimes sum in order).
MODELS: dict[str, tuple[Callable[[Path], Path], int, Callable[[np.ndarray], np.ndarray], float]] = {
    "onnx-logits": (lambda p: modelgen.classifier_onnx(p / "m.onnx", size=32), 1000, imagenet, 1e-5),
    "onnx-softmax": (lambda p: modelgen.classifier_onnx(p / "m.onnx", size=32, softmax=True), 1000, imagenet, 1e-5),
    # Fed at its default 224x224: the model's own mean is off by ~1e-4.
    "onnx-dynamic": (lambda p: modelgen.classifier_onnx(p / "m.onnx", dynamic=True, num_classes=10), 10,
                     imagenet, 5e-4),
    "tflite-float": (lambda p: modelgen.classifier_tflite(p / "m.tflite", size=32), 1001, tf_float, 1e-5),
    "tflite-uint8": (lambda p: modelgen.classifier_tflite(p / "m.tflite", size=32, quantized="uint8"), 1001,
                     tf_quantized, 1 / 256 + 1e-6),
    "tflite-int8": (lambda p: modelgen.classifier_tflite(p / "m.tflite", size=32, quantized="int8"), 1001,
                    tf_quantized, 1 / 256 + 1e-6),
}


def expected(colour: tuple[int, int, int], classes: int, view: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    w, b = modelgen.classifier_weights(classes)
    logits = view(np.asarray(colour, np.float64)) @ w.T.astype(np.float64) + b
    e = np.exp(logits - logits.max())
    return e / e.sum()


def load(tmp_path: Path, key: str, **options: object) -> tuple[Runtime, ImageClassifier]:
    runtime = open_runtime(MODELS[key][0](tmp_path))
    handler = choose_handler(runtime.signature, options=options)
    assert isinstance(handler, ImageClassifier)
    return runtime, handler


def classify(model: tuple[Runtime, ImageClassifier], image: Image.Image) -> np.ndarray:
    runtime, handler = model
    prepared = handler.preprocess(image)
    return handler.classify(runtime.run(prepared.feeds), prepared)


@pytest.mark.parametrize("key", list(MODELS))
def test_each_classifier_fits_the_classifier_family_only(tmp_path: Path, key: str) -> None:
    signature = open_runtime(MODELS[key][0](tmp_path)).signature
    assert [name for name, cls in REGISTRY.items() if cls.matches(signature)] == ["classifier"]
    assert choose_handler(signature).task == "classify"


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("colour", COLOURS)
def test_probabilities_are_the_known_function_of_the_image(
    tmp_path: Path, key: str, colour: tuple[int, int, int]
) -> None:
    # A uniform image stays uniform through any resize, so the model's input is known exactly;
    # logits get a softmax, probabilities (float or quantized) are taken as they are.
    _, classes, view, tolerance = MODELS[key]
    got = classify(load(tmp_path, key), Image.new("RGB", (300, 200), colour))
    want = expected(colour, classes, view)
    assert got.shape == (classes,)
    if tolerance < 1e-3:  # quantized probabilities round their small classes to 0: they need not sum to 1
        assert got.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(got, want, atol=tolerance)
    top = np.argsort(-want)[:5]
    assert list(np.argsort(-got, kind="stable")[:1]) == list(top[:1])


def test_a_forced_softmax_is_applied_to_probabilities_too(tmp_path: Path) -> None:
    plain = classify(load(tmp_path, "onnx-softmax"), Image.new("RGB", (8, 8), COLOURS[0]))
    forced = classify(load(tmp_path, "onnx-softmax", softmax=True), Image.new("RGB", (8, 8), COLOURS[0]))
    np.testing.assert_allclose(forced, np.exp(plain) / np.exp(plain).sum(), rtol=1e-6)


def test_normalisation_and_central_crop_options(tmp_path: Path) -> None:
    # A red square in a green frame: the central half is all red.
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[...] = (0, 255, 0)
    pixels[50:150, 75:225] = (255, 0, 0)
    framed = Image.fromarray(pixels)
    got = classify(load(tmp_path, "tflite-float", central_crop=0.5), framed)
    np.testing.assert_allclose(got, expected((255, 0, 0), 1001, tf_float), atol=1e-5)
    mean, std = [10.0, 20.0, 30.0], [50.0, 60.0, 70.0]
    got = classify(load(tmp_path, "tflite-float", mean=mean, std=std), Image.new("RGB", (9, 9), COLOURS[1]))
    np.testing.assert_allclose(got, expected(COLOURS[1], 1001, lambda p: (p - mean) / std), atol=1e-5)
    got = classify(load(tmp_path, "onnx-logits", input_range=[0, 1]), Image.new("RGB", (9, 9), COLOURS[2]))
    np.testing.assert_allclose(got, expected(COLOURS[2], 1000, lambda p: p / 255), atol=1e-5)


def test_dynamic_input_size_defaults_to_224_or_the_option(tmp_path: Path) -> None:
    assert load(tmp_path, "onnx-dynamic")[1].input_size == (224, 224)
    assert load(tmp_path, "onnx-dynamic", input_size=[160, 128])[1].input_size == (160, 128)


def test_labels_with_or_without_a_background_row_stay_aligned(tmp_path: Path) -> None:
    names = [f"class {i}" for i in range(1000)]
    _, tf = load(tmp_path, "tflite-float")  # 1001 outputs: row 0 is "background"
    assert tf.fit_labels(names) == ["background", *names]
    assert tf.fit_labels(["background", *names]) == ["background", *names]
    got = classify((open_runtime(tmp_path / "m.tflite"), tf), Image.new("RGB", (9, 9), COLOURS[0]))
    assert got[0] == 0.0  # the background row is never an answer
    _, onnx = load(tmp_path, "onnx-logits")  # 1000 outputs, a 1001-name labels file
    assert onnx.fit_labels(["background", *names]) == names
    with pytest.raises(ValueError, match="labels file has 998 names but the classifier outputs 1000 scores"):
        onnx.fit_labels(names[:998])


def test_options_are_checked_by_name(tmp_path: Path) -> None:
    signature = open_runtime(MODELS["onnx-logits"][0](tmp_path)).signature
    with pytest.raises(OptionsRejected, match="central_crop"):
        choose_handler(signature, options={"central_crop": 1.5})
    with pytest.raises(OptionsRejected, match="std"):
        choose_handler(signature, options={"std": [1.0, 2.0]})
    with pytest.raises(OptionsRejected, match="softmx"):
        choose_handler(signature, options={"softmx": True})
