"""Ultralytics exports served as exported: the size, class names and task their ONNX metadata states,
each output layout their exporter writes (v8-style, end-to-end, RT-DETR) decoded to known boxes, and
a model file without any labels served with class_<id> names instead of being refused (through the
real command line and the drop folder)."""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import modelgen
import numpy as np
import onnx
import pytest
from modelgen import YOLO_TRUTH, Truth, ultralytics_metadata
from PIL import Image
from structlog.testing import capture_logs
from test_startup import Running, _env

from handlers import Detection, Handler, choose_handler
from handlers.base import HandlerMismatch
from handlers.metadata import parse_metadata
from handlers.runtimes import Runtime, open_runtime
from supervisor.errors import ModelInvalid
from supervisor.serving.engine import Engine
from supervisor.serving.loader import load_and_warm
from supervisor.settings import Settings
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline

if TYPE_CHECKING:
    from conftest import StartWatcher, WaitUntil

NAMES = ("person", "bicycle", "car")


def load(path: Path, options: Mapping[str, Any] | None = None) -> tuple[Runtime, Handler]:
    runtime = open_runtime(path)
    return runtime, choose_handler(runtime.signature, options=options)


def detect(runtime: Runtime, handler: Handler, image: Image.Image) -> list[Detection]:
    prepared = handler.preprocess(image)
    return handler.postprocess(runtime.run(prepared.feeds), prepared)


def unletterbox(
    truth: Sequence[Truth], image: tuple[int, int], size: tuple[int, int] = (320, 320)
) -> list[Truth]:
    """Boxes in input pixels -> normalised to the image, through a centred letterbox, by hand."""
    scale = min(size[0] / image[0], size[1] / image[1])
    cw, ch = round(image[0] * scale), round(image[1] * scale)
    left, top = (size[0] - cw) // 2, (size[1] - ch) // 2
    out: list[Truth] = []
    for cls, score, (x0, y0, x1, y1) in truth:
        box = ((x0 - left) / cw, (y0 - top) / ch, (x1 - left) / cw, (y1 - top) / ch)
        out.append((cls, score, tuple(min(1.0, max(0.0, v)) for v in box)))  # type: ignore[misc]
    return out


def assert_detections(found: list[Detection], expected: Sequence[Truth], atol: float = 1e-5) -> None:
    want = sorted(expected, key=lambda t: -t[1])
    assert [d.class_id for d in found] == [t[0] for t in want]
    np.testing.assert_allclose([d.score for d in found], [t[1] for t in want], atol=1e-6)
    np.testing.assert_allclose([d.box for d in found], [t[2] for t in want], atol=atol)


def with_metadata(path: Path, props: Mapping[str, str]) -> Path:
    model = onnx.load(path)
    onnx.helper.set_model_props(model, dict(props))
    onnx.save(model, path)
    return path


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


# -- metadata --------------------------------------------------------------------------------------


def test_metadata_values_are_python_literals_read_without_eval() -> None:
    meta = parse_metadata({"names": "{0: 'person', 2: 'car'}", "imgsz": "[320, 480]", "task": "detect",
                           "stride": "32", "description": "Ultralytics YOLO11n model"})
    # A gap in the ids is named as the loader names a class without a label; imgsz is (h, w).
    assert meta.names == ("person", "class_1", "car")
    assert (meta.imgsz, meta.task, meta.stride, meta.problems) == ((480, 320), "detect", 32, ())
    assert parse_metadata({"names": "['a', 'b']", "imgsz": "640"}).names == ("a", "b")
    assert parse_metadata({"imgsz": "640"}).imgsz == (640, 640)
    assert parse_metadata({}).names is None and not parse_metadata({}).ultralytics


@pytest.mark.parametrize(("props", "words"), [
    ({"names": "__import__('os').system('touch pwned')"}, "'names' is not a Python literal"),
    ({"names": "{1000000000: 'x'}"}, "'names' has keys that are not class ids"),
    ({"names": "'person'"}, "'names' is not a list or a dict"),
    ({"names": "[" * 5000 + "]" * 5000}, "'names' is not a Python literal"),
    ({"imgsz": "[0, 320]"}, "'imgsz' is not a size"),
    ({"task": "detect; rm -rf /"}, "'task' is not a task name"),
])
def test_unreadable_metadata_is_left_out_and_said(
    props: dict[str, str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    meta = parse_metadata(props)
    assert (meta.names, meta.imgsz, meta.task) == (None, None, None)
    assert any(words in p for p in meta.problems), meta.problems
    assert not (tmp_path / "pwned").exists()


# -- the layouts their exporter writes ------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("image", [(640, 480), (300, 600)], ids=["wide", "tall"])
def test_v8_style_export_uses_its_metadata(tmp_path: Path, dynamic: bool, image: tuple[int, int]) -> None:
    """YOLOv5u/v8/v9/11 and YOLO26 without end2end: [1, 4+C, N] in input pixels, NMS here."""
    runtime, handler = load(modelgen.yolov8_onnx(tmp_path / "yolo11n.onnx", dynamic=dynamic,
                                                 metadata=ultralytics_metadata(NAMES, imgsz=(320, 320))))
    assert handler.name == "yolo" and handler.labels == NAMES and handler.num_classes == 3
    assert handler.input_size == (320, 320)
    assert handler.preprocess(Image.new("RGB", image)).feeds["images"].shape == (1, 3, 320, 320)
    assert_detections(detect(runtime, handler, Image.new("RGB", image)), unletterbox(YOLO_TRUTH, image))


def test_a_dynamic_export_runs_at_its_exported_size(tmp_path: Path) -> None:
    """Before: a dynamic-input export ran at 640 whatever it was exported at."""
    path = modelgen.yolov8_onnx(tmp_path / "m.onnx", dynamic=True, metadata=ultralytics_metadata(imgsz=(256, 320)))
    runtime, handler = load(path)
    assert handler.input_size == (320, 256)  # imgsz is [height, width]
    assert handler.preprocess(Image.new("RGB", (640, 480))).feeds["images"].shape == (1, 3, 256, 320)
    image = (800, 400)
    assert_detections(detect(runtime, handler, Image.new("RGB", image)), unletterbox(YOLO_TRUTH, image, (320, 256)))
    # The input_size option still wins; one the model's stride cannot take is refused by name.
    assert load(path, {"input_size": 416})[1].input_size == (416, 416)
    with pytest.raises(HandlerMismatch, match="330x330 is not a multiple of the model's stride 32"):
        load(path, {"input_size": 330})
    # Without metadata there is nothing to read: the family's default, as before.
    assert load(modelgen.yolov8_onnx(tmp_path / "bare.onnx", dynamic=True))[1].input_size == (640, 640)


def test_a_dynamic_export_s_anchor_count_is_unknown_until_it_runs() -> None:
    """export(dynamic=True) leaves the output [1, 4+C, anchors]: the names tell C, and so the layout."""
    from handlers.base import Signature, TensorSpec

    signature = Signature("onnx", (TensorSpec("images", (1, 3, None, None), "float32"),),
                          (TensorSpec("output0", (1, 84, None), "float32"),),
                          {"metadata": ultralytics_metadata([f"c{i}" for i in range(80)], imgsz=(480, 640))})
    handler = choose_handler(signature)
    assert (handler.num_classes, handler.input_size) == (80, (640, 480))
    assert handler.labels is not None and handler.labels[79] == "c79"


# x1, y1, x2, y2, score, class in input pixels of 320x320, as YOLOv10 / YOLO26 write them.
E2E_ROWS = [
    (40.0, 60.0, 120.0, 200.0, 0.92, 0),
    (44.0, 62.0, 122.0, 203.0, 0.81, 0),  # overlaps the first: end-to-end models keep both, no NMS
    (150.0, 100.0, 300.0, 180.0, 0.70, 2),
    (10.0, 2.0, 300.0, 30.0, 0.88, 1),  # wholly in the top letterbox band of a 640x480 image: dropped
    (200.0, 200.0, 260.0, 260.0, 0.03, 1),  # under the default cut-off (0.05)
]


def _e2e_truth(rows: Sequence[tuple[float, ...]]) -> list[Truth]:
    return [(int(r[5]), r[4], (r[0], r[1], r[2], r[3])) for r in rows]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_end2end_export_is_decoded_without_nms(tmp_path: Path, dynamic: bool) -> None:
    """YOLOv10, YOLO26 and nms=True exports: [1, 300, 6], one row per object, the rest zeros."""
    runtime, handler = load(modelgen.end2end_onnx(tmp_path / "yolo26n.onnx", E2E_ROWS, dynamic=dynamic,
                                                  metadata=ultralytics_metadata(NAMES)))
    assert (handler.input_size, handler.num_classes, handler.labels) == ((320, 320), 3, NAMES)
    found = detect(runtime, handler, Image.new("RGB", (640, 480)))
    # 640x480 letterboxed into 320x320: content 320x240 from row 40; the band row is gone.
    assert_detections(found, unletterbox(_e2e_truth(E2E_ROWS[:3]), (640, 480)))


def test_end2end_rows_need_the_metadata_or_the_option(tmp_path: Path) -> None:
    """Without a task in the metadata, [1, N, 6] is the YOLOv5 repository's one-class layout."""
    path = modelgen.end2end_onnx(tmp_path / "e2e.onnx", E2E_ROWS)
    assert load(path)[1].num_classes == 1  # read as v5: [N, 5 + 1]
    runtime, handler = load(path, {"output_layout": "end2end"})
    found = detect(runtime, handler, Image.new("RGB", (640, 480)))
    assert_detections(found, unletterbox(_e2e_truth(E2E_ROWS[:3]), (640, 480)))
    with pytest.raises(HandlerMismatch, match="rows of 6"):
        load(modelgen.yolov5_onnx(tmp_path / "v5.onnx"), {"output_layout": "end2end"})


RTDETR_TRUTH: list[Truth] = [
    (0, 0.91, (0.10, 0.20, 0.45, 0.80)),
    (2, 0.66, (0.50, 0.30, 0.90, 0.70)),
    (1, 0.04, (0.60, 0.60, 0.70, 0.70)),  # under the cut-off
]


def test_rtdetr_export_is_normalised_and_stretched(tmp_path: Path) -> None:
    """RT-DETR: [1, 300, 4+C], cx, cy, w, h normalised to the input, scores already sigmoid; trained
    on stretched images, so a stretched feed gives boxes normalised to the image as they are."""
    meta = ultralytics_metadata(NAMES, imgsz=(640, 640), description="Ultralytics rtdetr-l model trained on coco.yaml")
    path = modelgen.rtdetr_onnx(tmp_path / "rtdetr-l.onnx", RTDETR_TRUTH, 3, size=640, metadata=meta)
    runtime, handler = load(path)
    assert (handler.num_classes, handler.labels, handler.input_size) == (3, NAMES, (640, 640))
    tensor = handler.preprocess(Image.new("RGB", (640, 320), (255, 255, 255))).feeds["images"]
    np.testing.assert_allclose(tensor, 1.0)  # stretched: no letterbox band anywhere
    assert_detections(detect(runtime, handler, Image.new("RGB", (640, 320))), RTDETR_TRUTH[:2])
    # Letterboxed on request, the boxes go back through the letterbox.
    runtime, handler = load(path, {"resize": "letterbox"})
    in_pixels = [(c, s, tuple(v * 640 for v in box)) for c, s, box in RTDETR_TRUTH[:2]]
    assert_detections(detect(runtime, handler, Image.new("RGB", (640, 320))),
                      unletterbox(in_pixels, (640, 320), (640, 640)))  # type: ignore[arg-type]


def test_a_two_class_rtdetr_is_told_from_an_end2end_output(tmp_path: Path) -> None:
    """Both are [1, 300, 6]: the exporter's description names the RT-DETR."""
    truth: list[Truth] = [(1, 0.8, (0.25, 0.25, 0.5, 0.75))]
    meta = ultralytics_metadata(("cat", "dog"), description="Ultralytics rtdetr-l model trained on pets.yaml")
    runtime, handler = load(modelgen.rtdetr_onnx(tmp_path / "r.onnx", truth, 2, metadata=meta))
    assert handler.num_classes == 2
    assert_detections(detect(runtime, handler, Image.new("RGB", (500, 300))), truth)


def test_a_yolov5_repository_export_gets_its_names(tmp_path: Path) -> None:
    """The YOLOv5 repository's exporter writes stride and names only (no task): the v5 layout."""
    path = with_metadata(modelgen.yolov5_onnx(tmp_path / "yolov5s.onnx"), {"stride": "32", "names": str(list(NAMES))})
    runtime, handler = load(path)
    assert handler.labels == NAMES and handler.num_classes == 3
    assert_detections(detect(runtime, handler, Image.new("RGB", (640, 480))), unletterbox(YOLO_TRUTH, (640, 480)))


# -- tasks other than detection --------------------------------------------------------------------


@pytest.mark.parametrize(("task", "classes", "words"), [
    ("pose", 52, "a pose (keypoint) model (task 'pose' in its metadata); only detection and classification models"),
    ("segment", 35, "an instance segmentation model (task 'segment'"),
    ("obb", 16, "an oriented-box (OBB) model (task 'obb'"),
])
def test_a_task_other_than_detect_is_refused_naming_it(
    tmp_path: Path, task: str, classes: int, words: str
) -> None:
    """A pose head [1, 56, N] would otherwise decode as 52 classes of nonsense boxes."""
    folder = tmp_path / task
    folder.mkdir()
    modelgen.yolov8_onnx(folder / "model.onnx", (), num_classes=classes,
                         metadata=ultralytics_metadata(("person",), task=task))
    signature = open_runtime(folder / "model.onnx").signature
    with pytest.raises(HandlerMismatch, match=r"\(task") as caught:
        choose_handler(signature)
    assert words in str(caught.value)
    with pytest.raises(HandlerMismatch, match=f"task '{task}'"):
        choose_handler(signature, name="yolo")  # naming the family does not make it decode keypoints
    with pytest.raises(ModelInvalid) as invalid:
        load_and_warm(folder, 0.5)
    assert f"task '{task}'" in str(invalid.value) and len(str(invalid.value)) <= 200


def test_an_ultralytics_classification_export_is_served_with_its_own_names(tmp_path: Path) -> None:
    folder = tmp_path / "cls"
    folder.mkdir()
    path = modelgen.classifier_onnx(folder / "model.onnx", num_classes=3, size=224, softmax=True)
    model = onnx.load(str(path))
    for key, value in ultralytics_metadata(("cat", "dog", "bird"), imgsz=(224, 224), task="classify").items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    loaded = load_and_warm(folder, 0.5)
    try:
        assert loaded.handler.name == "classifier" and loaded.info.task == "classify"
        assert loaded.info.labels == ("cat", "dog", "bird") and loaded.info.labels_source == "model"
    finally:
        loaded.runtime.close()


# -- where labels come from -------------------------------------------------------------------------


def test_labels_file_beats_metadata_beats_class_ids(tmp_path: Path) -> None:
    meta = ultralytics_metadata(NAMES)

    def folder(name: str, files: Mapping[str, str], metadata: Mapping[str, str] | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        modelgen.yolov8_onnx(path / "model.onnx", metadata=metadata)
        for rel, text in files.items():
            (path / rel).write_text(text)
        return path

    from_file = load_and_warm(folder("file", {"labels.txt": "a\nb\nc\n"}, meta), 0.5)
    assert (from_file.info.labels, from_file.info.labels_source) == (("a", "b", "c"), "file")
    named = folder("named", {"classes.names.txt": "x\ny\nz\n", "model.json": '{"labels": "classes.names.txt"}'}, meta)
    assert load_and_warm(named, 0.5).info.labels == ("x", "y", "z")
    from_model = load_and_warm(folder("model", {}, meta), 0.5)
    assert (from_model.info.labels, from_model.info.labels_source) == (NAMES, "model")
    assert from_model.info.public()["labels_source"] == "model"
    with capture_logs() as logs:
        bare = load_and_warm(folder("bare", {}, None), 0.5)
    assert (bare.info.labels, bare.info.labels_source) == ((), "none")
    assert [bare.label(i) for i in range(3)] == ["class_0", "class_1", "class_2"]
    [warning] = [e for e in logs if e["event"] == "model_without_labels"]
    assert warning["log_level"] == "warning" and warning["classes"] == 3 and "class_<id>" in warning["hint"]
    # A labels file shorter than the model's classes is still refused (it names the wrong things).
    with pytest.raises(ModelInvalid, match="labels file has 2 names but the model has 3 classes"):
        load_and_warm(folder("short", {"labels.txt": "a\nb\n"}, meta), 0.5)


def test_metadata_survives_the_optimised_model_cache(tmp_path: Path) -> None:
    """Models over 1 MB load from onnxruntime's saved optimised graph after the first time."""
    modelgen.yolov8_onnx(tmp_path / "big.onnx", anchors=40_000, metadata=ultralytics_metadata(NAMES))
    assert load_and_warm(tmp_path, 0.5).info.labels == NAMES
    assert list((tmp_path / ".ort-cache").glob("*.ortopt")), "the cache was written"
    assert load_and_warm(tmp_path, 0.5).info.labels == NAMES


# -- through the service ----------------------------------------------------------------------------


def _post(url: str, data: bytes) -> dict[str, Any]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("metadata", [True, False], ids=["ultralytics", "no-labels-anywhere"])
def test_model_flag_serves_a_bare_onnx_file(tmp_path: Path, metadata: bool) -> None:
    """`edgeloader serve --model yolo11n.onnx`: no labels file, no manifest. Before: refused ("no
    labels"), and a dynamic-input export would have run at 640."""
    model = modelgen.yolov8_onnx(tmp_path / "yolo11n.onnx", dynamic=True,
                                 metadata=ultralytics_metadata(NAMES, imgsz=(320, 320)) if metadata else None)
    service = Running("--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data"), "--twin", "off",
                      "--model", str(model), env=_env(EDGELOADER_LOG_FORMAT="json"))
    try:
        url = service.wait_for("serving")["url"]
        body = _post(url + "detect?threshold=0.1", jpeg(640, 480))
        assert body["model"]["name"] == "yolo11n"
        size = (320, 320) if metadata else (640, 640)
        # The truth is in pixels of a 320x320 input: at 640 the same numbers would be other boxes.
        want = unletterbox(YOLO_TRUTH, (640, 480), size)
        names = NAMES if metadata else ("class_0", "class_1", "class_2")
        assert [(d["label"], d["class_id"]) for d in body["detections"]] == [(names[t[0]], t[0]) for t in want]
        got = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in body["detections"]]
        np.testing.assert_allclose(got, [np.array(t[2]) * [640, 480, 640, 480] for t in want], atol=0.06)
        with urllib.request.urlopen(url + "models", timeout=10) as response:
            models = json.loads(response.read())
        assert models["active"]["labels_source"] == ("model" if metadata else "none")
        warned = [r for r in service.seen if r.get("event") == "model_without_labels"]
        assert bool(warned) is not metadata
        assert service.stop() == 0
    finally:
        service.close()


async def test_a_bare_onnx_dropped_into_the_inbox_is_served(
    pipeline: Pipeline, settings: Settings, events: EventBus, engine: Engine,
    start_watcher: StartWatcher, wait_until: WaitUntil, tmp_path: Path,
) -> None:
    """A USB stick with only the exported .onnx: the names come from its metadata."""
    await start_watcher(pipeline)
    src = modelgen.end2end_onnx(tmp_path / "yolov10n.onnx", E2E_ROWS, dynamic=True,
                                metadata=ultralytics_metadata(NAMES, imgsz=(320, 320)))
    shutil.copy(src, settings.inbox_dir / "yolov10n.onnx")
    await wait_until(lambda: any(e.state == "active" and e.name == "yolov10n" for e in events.history),
                     within=10, what="the dropped model to become active")
    assert engine.active is not None and engine.active.info.labels_source == "model"
    result = await engine.detect(jpeg(640, 480), threshold=0.1)
    want = unletterbox(_e2e_truth(E2E_ROWS[:3]), (640, 480))
    assert [(d["label"], d["score"]) for d in result.detections] == [(NAMES[t[0]], round(t[1], 4)) for t in want]
