"""A package's bytes are read for hashing once per install, and a stored version's recorded hashes
are reused when it is loaded again (issue 11): on a device with a slow SD card, every extra pass
over a large model is seconds of I/O before the model serves."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from packages import ssd_files, write_zip

from supervisor.serving.engine import Engine
from supervisor.updates.pipeline import Pipeline
from supervisor.updates.repository import Repository

_real_sha256 = hashlib.sha256


class HashedBytes:
    """Counts every byte fed to hashlib.sha256 while installed."""

    total = 0

    def __init__(self, data: bytes = b"", **kwargs: Any) -> None:
        self._h = _real_sha256(data, **kwargs)
        HashedBytes.total += len(data)

    def update(self, data: bytes) -> None:
        HashedBytes.total += len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest(self) -> bytes:
        return self._h.digest()


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> type[HashedBytes]:
    HashedBytes.total = 0
    monkeypatch.setattr(hashlib, "sha256", HashedBytes)
    return HashedBytes


async def test_an_install_hashes_each_byte_once_and_a_reload_reuses_the_record(
    pipeline: Pipeline, engine: Engine, repo: Repository, hashed: type[HashedBytes],
) -> None:
    # 2 MB of weights beside the model: the ONNX optimised-model cache is used (its key covers them).
    files = ssd_files("tiny-ssd", "1", extra_files={"weights.bin": os.urandom(2_000_000)})
    unpacked = sum(len(b) for b in files.values())
    package = write_zip(repo.inbox_dir / "big.zip", files)
    zipped = package.stat().st_size
    hashed.total = 0
    version = await pipeline.process(package, source="inbox")
    assert version is not None and engine.active is not None and engine.active.info.version == "1"
    # The zip (the sender's checksum) and the unpacked files, once each; before: about four passes.
    assert hashed.total <= zipped + unpacked + 100_000, (hashed.total, zipped, unpacked)

    await pipeline.process(write_zip(repo.inbox_dir / "two.zip", ssd_files("tiny-ssd", "2")), source="inbox")
    hashed.total = 0
    await pipeline.activate("tiny-ssd", "1")  # a stored version, loaded again
    assert engine.active.info.version == "1"
    assert hashed.total < 100_000, f"{hashed.total} bytes re-hashed for a stored version"
    assert engine.active.info.model_sha256 == _real_sha256(files["model.onnx"]).hexdigest()
