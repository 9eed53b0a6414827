"""The Makefile, run for real in a scratch copy: `make clean` keeps the model repository."""

from __future__ import annotations

import shutil
import subprocess
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
