"""The Makefile, run for real in a scratch copy: `make clean` keeps the model repository."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "mk", tmp_path / "mk")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "var" / "models" / "ssd" / "2").mkdir(parents=True)
    (tmp_path / "var" / "models" / "ssd" / "2" / "model.onnx").write_bytes(b"an operator's model")
    return tmp_path


def test_clean_keeps_the_model_repository_unless_asked(checkout: Path) -> None:
    subprocess.run(["make", "clean"], cwd=checkout, check=True, capture_output=True, timeout=60)
    assert not (checkout / ".venv").exists()
    assert (checkout / "var" / "models" / "ssd" / "2" / "model.onnx").read_bytes() == b"an operator's model"
    subprocess.run(["make", "clean-data"], cwd=checkout, check=True, capture_output=True, timeout=60)
    assert not (checkout / "var").exists()


# A stand-in interpreter: records how the Makefile calls it, so the install steps are checked without
# installing anything. `make run` must install only what serving needs; the tools come with `make test`.
_RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"
"""


@pytest.fixture
def recorded(checkout: Path) -> Path:
    (checkout / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for name in ("python", "edgeloader", "mypy", "ruff"):
        tool = checkout / ".venv" / "bin" / name
        tool.write_text(_RECORDER)
        tool.chmod(0o755)
    return checkout


def _make(checkout: Path, *targets: str) -> list[str]:
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run(["make", *targets], cwd=checkout, check=True, capture_output=True, timeout=60)
    return [line.strip() for line in log.read_text().splitlines()]


def test_run_installs_only_the_runtime_and_test_adds_the_dev_tools(recorded: Path) -> None:
    calls = _make(recorded, "run", "PORT=9123")
    installs = [c for c in calls if " -m pip install " in c and "--upgrade pip" not in c]
    assert installs == ["python -m pip install --quiet -e ."], calls
    assert calls[-1] == "edgeloader serve --host 0.0.0.0 --port 9123 --data-dir ./var"

    calls = _make(recorded, "typecheck")  # a target that needs the development tools
    assert calls == ["python -m pip install --quiet -e .[dev]", "mypy"], calls
    assert _make(recorded, "run") == ["edgeloader serve --host 0.0.0.0 --port 8080 --data-dir ./var"]

    # A change to the dependencies installs both levels again, in order.
    time.sleep(1.1)  # make compares modification times with a resolution of a second on some filesystems
    (recorded / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    calls = _make(recorded, "typecheck")
    assert [c for c in calls if "install --quiet -e" in c] == [
        "python -m pip install --quiet -e .", "python -m pip install --quiet -e .[dev]"], calls
