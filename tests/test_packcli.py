"""`edgeloader pack` and `edgeloader verify`: packages built by `pack` are accepted by the device,
and `verify` says what the pipeline would say, without touching any repository."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from packages import BAD_PACKAGES, BUNDLED, SSD_LABELS, bad_package, ssd_onnx, write_folder

from supervisor.__main__ import main
from supervisor.cli.pack import pack_main, verify_main
from supervisor.package.reader import file_sha256
from supervisor.serving.engine import Engine
from supervisor.updates.events import EventBus
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """What a data scientist has: a model and its labels, no manifest."""
    return write_folder(tmp_path / "my-detector", {"model.onnx": ssd_onnx(), "labels.txt": SSD_LABELS.encode()})


def test_pack_writes_a_manifest_with_every_files_hash(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dist" / "detector.zip"
    code = pack_main([str(model_dir), "-o", str(out), "--version", "2024.1", "--handler", "onnx_ssd",
                      "--score-threshold", "0.1"])
    assert code == 0, capsys.readouterr().err
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["model.json", "labels.txt", "model.onnx"]
        manifest = json.loads(zf.read("model.json"))
    assert manifest["name"] == "my-detector" and manifest["version"] == "2024.1"
    assert manifest["handler"] == "onnx_ssd" and manifest["model"] == "model.onnx"
    assert manifest["labels"] == "labels.txt" and manifest["score_threshold"] == 0.1
    assert manifest["files"] == {
        "labels.txt": file_sha256(model_dir / "labels.txt"),
        "model.onnx": file_sha256(model_dir / "model.onnx"),
    }
    printed = capsys.readouterr().out
    assert "valid" in printed and f"packed {out}" in printed
    assert not list(out.parent.glob("*.part"))


def test_pack_is_reproducible(model_dir: Path, tmp_path: Path) -> None:
    for name in ("a.zip", "b.zip"):
        assert pack_main([str(model_dir), "-o", str(tmp_path / name), "--version", "1", "--no-verify"]) == 0
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_pack_keeps_the_folders_own_manifest(tmp_path: Path) -> None:
    out = tmp_path / "faces.zip"
    assert pack_main([str(BUNDLED), "-o", str(out)]) == 0
    with zipfile.ZipFile(out) as zf:
        manifest = json.loads(zf.read("model.json"))
    bundled = json.loads((BUNDLED / "model.json").read_text())
    assert manifest["name"] == bundled["name"] and manifest["description"] == bundled["description"]
    assert set(manifest["files"]) == {"LICENSE.txt", "face_detection_short_range.tflite", "labels.txt"}


def test_pack_refuses_what_the_device_would(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pack_main([str(model_dir), "-o", str(tmp_path / "x.zip"), "--handler", "yolo5"]) == 1
    assert "unknown handler 'yolo5'; did you mean 'yolo'?" in capsys.readouterr().err
    (model_dir / "model.json").write_text('{"handler_options": {"pixel_fromat": "bgr"}}')
    assert pack_main([str(model_dir), "-o", str(tmp_path / "x.zip"), "--version", "1"]) == 1
    assert "did you mean 'pixel_format'?" in capsys.readouterr().err
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()
    assert pack_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.zip")]) == 2
    assert pack_main([str(model_dir), "-o", str(model_dir / "x.zip"), "--version", "1"]) == 2


async def test_a_packed_zip_dropped_with_its_sha256_becomes_active(
    model_dir: Path, pipeline: Pipeline, repo: Repository, engine: Engine, events: EventBus
) -> None:
    out = repo.inbox_dir / "detector.zip"
    assert pack_main([str(model_dir), "-o", str(out), "--version", "3", "--sha256",
                      "--handler", "onnx_ssd"]) == 0
    assert (repo.inbox_dir / "detector.zip.sha256").read_text().split()[0] == file_sha256(out)
    await pipeline.process(out, source="inbox")
    assert engine.active is not None and (engine.active.info.name, engine.active.info.version) == ("my-detector", "3")
    assert events.history[-1].state == "active"


def test_a_model_without_labels_packs_and_says_how_it_will_be_labelled(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_dir / "labels.txt").unlink()
    assert pack_main([str(model_dir), "-o", str(tmp_path / "x.zip"), "--version", "1"]) == 0
    capsys.readouterr()
    assert verify_main([str(tmp_path / "x.zip")]) == 0
    assert "labels    none: detections are labelled class_<id>" in capsys.readouterr().out
    assert verify_main([str(tmp_path / "x.zip"), "--json"]) == 0
    # The CLI leaves logging unconfigured: structlog's default prints the warning before the report.
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (report["labels"], report["labels_source"]) == (0, "none")


def test_verify_a_good_package(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.zip"
    assert pack_main([str(model_dir), "-o", str(out), "--version", "1", "--no-verify", "--no-activate"]) == 0
    capsys.readouterr()
    assert verify_main([str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and report["handler"] == "onnx_ssd"
    assert (report["name"], report["version"], report["labels"]) == ("my-detector", "1", 2)
    assert report["files_checked"] == 2 and report["activate"] is False
    assert report["package_sha256"] == file_sha256(out)
    # The same through the command line entry point, human-readable; a bare model folder works too.
    assert main(["verify", str(BUNDLED)]) == 0
    assert "blazeface-short-range 1" in capsys.readouterr().out


@pytest.mark.parametrize("kind", sorted(BAD_PACKAGES))
def test_verify_says_what_the_pipeline_says(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGELOADER_DATA_DIR", str(tmp_path / "data"))
    path, words = bad_package(kind, tmp_path / "usb")
    assert verify_main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err and all(w in err for w in words), err
    # Nothing installed, quarantined or removed: verify only reads.
    assert path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usb"]


def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_main([str(tmp_path / "nothing.zip")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_readme_pack_command_works_as_written(model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeloader pack DIR -o model.zip`: no --version needed; the version comes from the contents."""
    assert main(["pack", str(model_dir), "-o", str(tmp_path / "model.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "model.zip") as zf:
        version = json.loads(zf.read("model.json"))["version"]
    assert len(version) == 12 and int(version, 16) >= 0
    assert "made from the files' contents" in capsys.readouterr().out
    assert main(["pack", str(model_dir), "-o", str(tmp_path / "again.zip")]) == 0
    assert (tmp_path / "again.zip").read_bytes() == (tmp_path / "model.zip").read_bytes()
    (model_dir / "labels.txt").write_text("background\nsomething else\n")
    assert main(["pack", str(model_dir), "-o", str(tmp_path / "changed.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "changed.zip") as zf:
        assert json.loads(zf.read("model.json"))["version"] != version


_WITHOUT_RUNTIMES = """
import importlib.abc, sys
sys.path.insert(0, sys.argv.pop(1))
BLOCKED = ("onnxruntime", "ai_edge_litert", "tflite_runtime", "aiohttp")

class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Unimportable())
from supervisor.__main__ import main
code = main(sys.argv[1:])
touched = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("imported:", touched, file=sys.stderr)
sys.exit(code if not touched else 3)
"""


@pytest.mark.parametrize("model", ["onnx", "tflite"])
def test_pack_and_twin_patch_run_without_the_runtimes_or_aiohttp(model: str, model_dir: Path, tmp_path: Path) -> None:
    """A build machine or CI job that packs and publishes needs neither onnxruntime, LiteRT nor aiohttp."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    folder = model_dir if model == "onnx" else BUNDLED

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_RUNTIMES, repo, *argv], capture_output=True, text=True,
                              timeout=60)

    out = tmp_path / "model.zip"
    packed = run("pack", str(folder), "-o", str(out))
    assert packed.returncode == 0, packed.stderr
    assert "is not installed" in packed.stderr and "the other checks passed" in packed.stderr
    patch = run("twin-patch", str(out), "--url", "https://acct.blob.core.windows.net/m/model.zip?sv=1&sig=S")
    assert patch.returncode == 0, patch.stderr
    assert json.loads(patch.stdout)["ContentSHA256"] == file_sha256(out)
    # Where the runtime is installed, the package is valid.
    assert verify_main([str(out)]) == 0
