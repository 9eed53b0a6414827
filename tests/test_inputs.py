"""What a user types into model.json and handler_options, tried as a new user would: each mistake is
refused with one line that names the key and the form expected (or the nearest valid key), and the
forms that mean something obvious (``"input_size": 320``) are accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from modelgen import ssd_mobilenet_onnx
from packages import SSD_LABELS, ssd_files, ssd_onnx, write_folder, write_zip

from supervisor.cli.pack import verify_main
from supervisor.package.manifest import manifest_schema
from supervisor.package.reader import PackageError, read_manifest
from supervisor.settings import load_settings
from supervisor.updates.verify import validate_package

REPO = Path(__file__).resolve().parent.parent


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def _folder(tmp_path: Path, **manifest: Any) -> Path:
    """A valid SSD package whose model.json then gets ``manifest``'s keys."""
    files = ssd_files("tiny-ssd", "1")
    files["model.json"] = json.dumps({**json.loads(files["model.json"]), **manifest}).encode()
    return write_folder(tmp_path / "pkg", files)


@pytest.mark.parametrize(("manifest", "words"), [
    ({"activate": "false"}, ("'activate' must be true or false", "not 'false'")),
    ({"score_treshold": 0.3}, ("unknown key 'score_treshold'", "did you mean 'score_threshold'?")),
    ({"score_threshold": "0.5"}, ("'score_threshold' must be a number", "'0.5' (text)")),
    ({"score_threshold": 1.5}, ("'score_threshold' must be at most 1", "1.5")),
    ({"version": 2.5}, ("'version' must be text or a whole number",)),
    ({"model": "../model.onnx"}, ("'model' must be a path inside the package",)),
    ({"files": {"model.onnx": "abc"}}, ("'files'", "64 hex digits")),
    ({"handler": "yolo5"}, ("unknown handler 'yolo5'", "did you mean 'yolo'?")),
    ({"handler_options": {"min_scor": 0.2}},
     ("unknown key 'min_scor' in handler_options (handler onnx_ssd)", "did you mean 'min_score'?")),
    ({"handler_options": {"input_size": "320"}},
     ("handler_options.input_size must be a whole number of pixels or [width, height]", "'320' (text)")),
    ({"handler": "yolo", "handler_options": {"layout": "v9"}},
     ("handler_options.layout must be 'nhwc' or 'nchw', not 'v9'",)),
    ({"handler": "yolo", "handler_options": {"output_layout": "v9"}},
     ("handler_options.output_layout must be 'v5', 'v8', 'end2end' or 'rtdetr', not 'v9'",)),
    ({"handler": "yolo", "handler_options": {"pixel_fromat": "bgr"}},
     ("unknown key 'pixel_fromat' in handler_options (handler yolo)", "did you mean 'pixel_format'?")),
    ({"handler": "yolo", "handler_options": {"std": [58, 57, 0]}},
     ("handler_options.std must be a number or three numbers above 0",)),
    ({"handler": "onnx_yolov3", "handler_options": {"resize": "stretch"}},
     ("unknown key 'resize' in handler_options (handler onnx_yolov3)",)),
    ({"handler": "tflite_ssd", "handler_options": {"input_range": [0]}},
     ("handler_options.input_range must be [low, high]",)),
])
def test_a_mistake_in_model_json_is_one_line_naming_the_key(
    manifest: dict[str, Any], words: tuple[str, ...], tmp_path: Path
) -> None:
    with pytest.raises(PackageError) as caught:
        read_manifest(_folder(tmp_path, **manifest))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.json: ")
    assert all(w in message for w in words), message


def test_verify_names_the_bad_option_instead_of_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "input_size": "320" was read as (3, 2); 320 crashed verify with a TypeError."""
    package = write_zip(tmp_path / "p.zip", ssd_files("p", "1", handler_options={"input_size": "320"}))
    assert verify_main([str(package)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "INVALID: model.json: handler_options.input_size must be a whole number" in err


@pytest.mark.parametrize(("given", "size"), [(320, (320, 320)), ([320, 240], (320, 240))])
def test_input_size_takes_a_number_or_width_and_height(given: Any, size: tuple[int, int], tmp_path: Path) -> None:
    folder = tmp_path / "ssd"
    folder.mkdir()
    ssd_mobilenet_onnx(folder / "model.onnx")  # dynamic height and width
    labels = "\n".join(f"class{i}" for i in range(20)) + "\n"
    (folder / "labels.txt").write_text(labels)
    (folder / "model.json").write_text(json.dumps(
        {"name": "ssd", "version": "1", "handler": "onnx_ssd", "handler_options": {"input_size": given}}))
    settings = load_settings({"data_dir": tmp_path / "data"}, env={})
    checked = validate_package(folder, _empty(tmp_path / "work"), settings)
    try:
        assert checked.model.handler.input_size == size
    finally:
        checked.model.runtime.close()


def test_options_of_a_family_chosen_by_signature_are_checked_at_load(tmp_path: Path) -> None:
    """No handler named: the options are checked against the family the model's signature picks."""
    folder = write_folder(tmp_path / "pkg", {"model.onnx": ssd_onnx(), "labels.txt": SSD_LABELS.encode(),
                                             "model.json": b'{"handler_options": {"iou_threshold": 0.5}}'})
    settings = load_settings({"data_dir": tmp_path / "data"}, env={})
    from supervisor.errors import ModelInvalid

    with pytest.raises(ModelInvalid, match=r"unknown key 'iou_threshold' in handler_options \(handler onnx_ssd\)"):
        validate_package(folder, _empty(tmp_path / "work"), settings)


def test_the_published_json_schema_is_the_one_the_code_generates(capsys: pytest.CaptureFixture[str]) -> None:
    """As the README says to regenerate it: the command prints exactly the published file."""
    import subprocess
    import sys

    from supervisor.package.manifest import main

    published = json.loads((REPO / "docs" / "model.schema.json").read_text())
    assert published == manifest_schema(), "regenerate: python -m supervisor.package.manifest > docs/model.schema.json"
    assert main() == 0 and json.loads(capsys.readouterr().out) == published
    proc = subprocess.run([sys.executable, "-m", "supervisor.package.manifest"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == published
    assert "python -m supervisor.package.manifest" in (REPO / "README.md").read_text()


def test_a_manifest_that_is_no_object_and_versions_given_as_numbers(tmp_path: Path) -> None:
    from supervisor.package.manifest import parse_manifest

    for raw in ([], "ssd", 3, None):
        with pytest.raises(ValueError, match=r"model\.json must hold a JSON object"):
            parse_manifest(raw)
    parsed = parse_manifest({"name": "ssd", "version": 3})
    assert parsed.version == "3" and isinstance(parsed.version, str)
    with pytest.raises(ValueError, match="version"):
        parse_manifest({"version": True})  # a bool is no whole number


def test_the_json_schema_checks_a_manifest_as_the_device_does() -> None:
    """An editor using docs/model.schema.json flags what the device refuses, and accepts the bundled one."""
    import jsonschema

    schema = manifest_schema()
    validator = jsonschema.Draft202012Validator(schema)
    bundled = json.loads((REPO / "supervisor" / "bundled" / "blazeface-short-range" / "model.json").read_text())
    assert not list(validator.iter_errors(bundled))
    assert not list(validator.iter_errors({"handler": "yolo", "handler_options": {
        "input_size": 320, "output_layout": "v8", "layout": "nchw", "mean": [0, 0, 0], "std": 255, "nms": "agnostic"}}))
    for bad in ({"activate": "false"}, {"min_scor": 1}, {"handler": "yolo", "handler_options": {"layout": "v9"}},
                {"handler": "onnx_ssd", "handler_options": {"iou_threshold": 0.5}},
                {"handler": "yolo", "handler_options": {"std": [1, 2]}},
                {"handler": "onnx_yolov3", "handler_options": {"pad_position": "bottom-right"}},
                {"handler_options": {"input_size": "320"}}):
        assert list(validator.iter_errors(bad)), bad


async def test_openapi_carries_the_manifest_schema(aiohttp_client, tmp_path: Path) -> None:
    from supervisor.app import build_app

    client = await aiohttp_client(build_app(load_settings({"data_dir": tmp_path, "twin": "off"}, env={}),
                                            services=False))
    document = await (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    manifest = schemas["ModelManifest"]
    assert set(manifest["properties"]) >= {"name", "version", "handler", "activate", "handler_options"}
    assert manifest["properties"]["handler_options"]["anyOf"][0]["$ref"].startswith("#/components/schemas/")
    assert "YoloOptions" in schemas
