"""Package formats a user meets beyond the plain case: labels inside TFLite metadata, ONNX
weights in an external-data sidecar, labelmap styles, and a package without model.json."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import modelgen
import onnx
import pytest

from supervisor.errors import ModelInvalid
from supervisor.package.reader import read_labels, read_manifest
from supervisor.serving.loader import load_and_warm

COCO90 = [f"class{i}" for i in range(90)]


def test_labels_embedded_in_tflite_metadata_are_used(tmp_path: Path) -> None:
    """TFLite Model Maker packs labels as a zip appended to the .tflite file."""
    model = modelgen.ssd_tflite(tmp_path / "detect.tflite")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("labelmap.txt", "\n".join(COCO90) + "\n")
    model.write_bytes(model.read_bytes() + buf.getvalue())
    loaded = load_and_warm(tmp_path, 0.5)
    assert loaded.info.labels == tuple(COCO90)
    assert loaded.info.handler == "tflite_ssd"
    assert loaded.label(17) == "class17"


def test_onnx_with_external_data_sidecar_loads_from_its_folder(tmp_path: Path) -> None:
    src = modelgen.tiny_yolov3_onnx(tmp_path / "src.onnx")
    folder = tmp_path / "pkg"
    folder.mkdir()
    proto = onnx.load(src)
    onnx.save_model(proto, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (folder / "model.onnx.data").stat().st_size > 0
    (folder / "coco_classes.txt").write_text("\n".join(f"c{i}" for i in range(80)))
    loaded = load_and_warm(folder, 0.5)
    assert loaded.info.handler == "onnx_yolov3" and len(loaded.info.labels) == 80
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ModelInvalid):
        load_and_warm(folder, 0.5)


@pytest.mark.parametrize("text", ["0 person\n1 car\n", "0: person\n1: car\n", "person\ncar\n\n"])
def test_labelmap_styles(tmp_path: Path, text: str) -> None:
    modelgen.ssd_tflite(tmp_path / "m.tflite")
    (tmp_path / "labelmap.txt").write_text(text)
    manifest = read_manifest(tmp_path, "fallback", "v1")
    assert read_labels(tmp_path, manifest) == ["person", "car"]


def test_without_manifest_name_and_version_are_inferred(tmp_path: Path) -> None:
    modelgen.ssd_tflite(tmp_path / "m.tflite")
    (tmp_path / "labels.txt").write_text("a\n")
    manifest = read_manifest(tmp_path, "ssd from usb", "abc123")
    assert (manifest.name, manifest.version, manifest.model_file) == ("ssd-from-usb", "abc123", "m.tflite")
    assert manifest.activate is True and manifest.handler is None


def test_labels_shorter_than_the_model_classes_are_refused(tmp_path: Path) -> None:
    modelgen.tiny_yolov3_onnx(tmp_path / "m.onnx")
    (tmp_path / "labels.txt").write_text("only\nthree\nnames\n")
    with pytest.raises(ModelInvalid, match="3 names but the model has 80 classes"):
        load_and_warm(tmp_path, 0.5)
