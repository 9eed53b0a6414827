"""The per-device cache of optimised ONNX models (handlers/ort_cache.py, handlers/runtimes.py ``OnnxRuntime``).

Test models are far under the size worth caching, so each test lowers the threshold to 0."""

from __future__ import annotations

import zipfile
from pathlib import Path

import modelgen
import numpy as np
import onnx
import pytest
from packages import ssd_files, write_folder, write_zip
from structlog.testing import capture_logs

import handlers.ort_cache as ort_cache
import handlers.runtimes as runtimes
from handlers.ort_cache import OPTIMIZED_CACHE_DIR
from handlers.runtimes import OnnxRuntime, open_runtime
from supervisor.package.archive import ArchiveLimits, unpack_package
from supervisor.package.checks import package_sha256
from supervisor.package.reader import read_manifest
from supervisor.serving.engine import Engine
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository


@pytest.fixture(autouse=True)
def cache_every_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_cache, "_CACHE_MIN_BYTES", 0)


def cache_files(model: Path) -> list[str]:
    folder = model.parent / OPTIMIZED_CACHE_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def feeds(size: int = 416) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_1": rng.random((1, 3, size, size), dtype=np.float32),
            "image_shape": np.array([[480, 640]], np.float32)}


def forbidden(*args: object) -> None:
    raise AssertionError("the original was loaded although the cache is there")


def loads(logs: list[dict[str, object]]) -> list[str]:
    return [str(e["event"]) for e in logs if str(e["event"]).startswith("onnx_cache")]


def test_first_load_writes_the_cache_and_later_loads_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = modelgen.tiny_yolov3_onnx(tmp_path / "tiny.onnx")
    reference = OnnxRuntime(model, cache=False)
    assert cache_files(model) == []
    with capture_logs() as logs:
        first = open_runtime(model)
    assert loads(logs) == ["onnx_cache_written"]
    name, data = cache_files(model)
    assert name.startswith("tiny-") and name.endswith(".ortopt"), "not *.onnx: a package has one model file"
    assert data.startswith(name + ".") and data.endswith(".data")

    monkeypatch.setattr(OnnxRuntime, "_load_original", forbidden)
    with capture_logs() as logs:
        second = open_runtime(model)
    assert loads(logs) == []
    assert cache_files(model) == [name, data]
    assert first.signature == second.signature == reference.signature
    want = reference.run(feeds())
    for runtime in (first, second):
        got = runtime.run(feeds())
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_a_changed_file_beside_the_model_gets_a_new_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """External data: same model file, other weights in the sidecar. The stale cache is removed."""
    m = onnx.load(modelgen.tiny_yolov3_onnx(tmp_path / "src.onnx"))
    folder = tmp_path / "pkg"
    folder.mkdir()
    model = folder / "tiny.onnx"
    onnx.save_model(m, model, save_as_external_data=True, location="tiny.onnx.data", size_threshold=0)
    before = open_runtime(model).run(feeds())
    old = cache_files(model)
    # The cache holds its own weights: it loads (and agrees) without the original.
    with monkeypatch.context() as m:
        m.setattr(OnnxRuntime, "_load_original", forbidden)
        again = open_runtime(model).run(feeds())
    for key in before:
        np.testing.assert_array_equal(again[key], before[key])

    # The same graph with another truth: other initializer values, same sizes.
    other = onnx.load(modelgen.tiny_yolov3_onnx(tmp_path / "other.onnx", truth=[(5, 0.7, (0.2, 0.2, 0.6, 0.6))] * 3))
    onnx.save_model(other, tmp_path / "o.onnx", save_as_external_data=True, location="tiny.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "tiny.onnx.data").stat().st_size == (folder / "tiny.onnx.data").stat().st_size
    (folder / "tiny.onnx.data").write_bytes((tmp_path / "tiny.onnx.data").read_bytes())
    assert model.read_bytes() == (tmp_path / "o.onnx").read_bytes(), "only the sidecar differs"

    after = open_runtime(model).run(feeds())
    new = cache_files(model)
    assert len(new) == 2 and not set(new) & set(old), "the stale cache is replaced, not kept beside the new one"
    assert not np.array_equal(after["yolonms_layer_1"], before["yolonms_layer_1"])
    want = OnnxRuntime(model, cache=False).run(feeds())
    np.testing.assert_array_equal(after["yolonms_layer_1"], want["yolonms_layer_1"])


def test_a_damaged_cache_is_replaced(tmp_path: Path) -> None:
    model = modelgen.tiny_yolov3_onnx(tmp_path / "tiny.onnx")
    open_runtime(model)
    name, data = cache_files(model)
    cached = model.parent / OPTIMIZED_CACHE_DIR / name
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    with capture_logs() as logs:
        runtime = open_runtime(model)
    assert loads(logs) == ["onnx_cache_unreadable", "onnx_cache_written"]
    assert runtime.run(feeds())["yolonms_layer_1"].shape[1] > 0
    name2, data2 = cache_files(model)
    assert name2 == name and data2 != data, "made again, with weights of its own; the old ones removed"
    # Weights gone: the graph no longer loads; made again.
    (model.parent / OPTIMIZED_CACHE_DIR / data2).unlink()
    with capture_logs() as logs:
        open_runtime(model)
    assert loads(logs) == ["onnx_cache_unreadable", "onnx_cache_written"]
    with capture_logs() as logs:
        open_runtime(model)
    assert loads(logs) == []


def test_a_cache_that_cannot_be_written_costs_nothing_but_the_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = modelgen.tiny_yolov3_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setattr(ort_cache, "new_work_dir", lambda cached: tmp_path / "missing")
    with capture_logs() as logs:
        runtime = open_runtime(model)
    assert loads(logs) == ["onnx_cache_not_written"]
    assert runtime.run(feeds())["yolonms_layer_1"].shape[1] > 0
    # A model that does not load at all is still refused, with onnxruntime's reason.
    bad = tmp_path / "bad" / "bad.onnx"
    bad.parent.mkdir()
    bad.write_bytes(b"not a model")
    with pytest.raises(runtimes.ModelLoadError, match=r"cannot load bad\.onnx"):
        open_runtime(bad)


def test_small_models_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = modelgen.tiny_yolov3_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setattr(ort_cache, "_CACHE_MIN_BYTES", model.stat().st_size + 1)
    open_runtime(model)
    assert not (tmp_path / OPTIMIZED_CACHE_DIR).exists()
    # With external data, the sidecar counts: the .onnx alone is small.
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(onnx.load(model), folder / "tiny.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    monkeypatch.setattr(ort_cache, "_CACHE_MIN_BYTES", (folder / "tiny.onnx").stat().st_size + 1)
    open_runtime(folder / "tiny.onnx")
    assert cache_files(folder / "tiny.onnx")


def test_packages_never_hash_or_take_in_a_cache(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "pkg", ssd_files("tiny-ssd", "1"))
    sha = package_sha256(folder)
    open_runtime(folder / "model.onnx")
    assert cache_files(folder / "model.onnx"), "the runtime wrote a cache into the folder"
    assert package_sha256(folder) == sha
    limits = ArchiveLimits()
    (tmp_path / "copy").mkdir()
    unpack_package(folder, tmp_path / "copy", limits)
    assert not (tmp_path / "copy" / OPTIMIZED_CACHE_DIR).exists()
    zipped = write_zip(tmp_path / "pkg.zip", {p.relative_to(folder).as_posix(): p.read_bytes()
                                              for p in folder.rglob("*") if p.is_file()})
    assert any(OPTIMIZED_CACHE_DIR in n for n in zipfile.ZipFile(zipped).namelist())
    (tmp_path / "unzipped").mkdir()
    unpack_package(zipped, tmp_path / "unzipped", limits)
    assert not (tmp_path / "unzipped" / OPTIMIZED_CACHE_DIR).exists()
    assert (tmp_path / "unzipped" / "model.onnx").is_file()


async def test_installed_versions_keep_their_cache(
    pipeline: Pipeline, engine: Engine, repo: Repository
) -> None:
    """Validation writes it in staging; the install moves it with the version; activations read it."""
    with capture_logs() as logs:
        await pipeline.process(write_zip(repo.inbox_dir / "a.zip", ssd_files("tiny-ssd", "1")), source="inbox")
        installed = repo.get("tiny-ssd", "1")
        assert installed is not None and cache_files(installed.path / "model.onnx")
        await pipeline.activate("blazeface-short-range", "1")
        await pipeline.activate("tiny-ssd", "1")
    assert loads(logs) == ["onnx_cache_written"]
    assert engine.active is not None and engine.active.info.version == "1"


async def test_a_cache_write_cut_by_a_crash_does_not_break_the_version(
    pipeline: Pipeline, engine: Engine, repo: Repository
) -> None:
    """kill -9 during a cache write leaves .ort-cache/.tmp-*/plain.onnx: still one model in the version
    (a package without model.json, where the model file is found by looking)."""
    files = {k: v for k, v in ssd_files("tiny-ssd", "1").items() if k != "model.json"}
    installed = await pipeline.process(write_zip(repo.inbox_dir / "tiny-ssd.zip", files), source="inbox")
    assert installed is not None and installed.name == "tiny-ssd"
    leftover = installed.path / OPTIMIZED_CACHE_DIR / ".tmp-0123456789ab" / "plain.onnx"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes((installed.path / "model.onnx").read_bytes()[:1000])  # half written
    assert read_manifest(installed.path).model_file == "model.onnx"
    await pipeline.activate("blazeface-short-range", "1")
    await pipeline.activate("tiny-ssd", installed.version)
    assert engine.active is not None
    assert (engine.active.info.name, engine.active.info.version) == ("tiny-ssd", installed.version)
