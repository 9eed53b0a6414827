"""Rejection reasons a user can act on: in /models, reason.json and events, a reason names files as
they are in the package (never the device's data directory or a staging folder), keeps the runtime's
useful words without its boilerplate, and fits in ~200 characters; the full text is in the log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from aiohttp.test_utils import TestClient
from packages import SSD_LABELS, package_files, ssd_files, write_zip
from structlog.testing import capture_logs

from supervisor.app import build_app
from supervisor.formats import REASON_FILE
from supervisor.http.keys import PIPELINE
from supervisor.package.reasons import MAX_REASON, user_reason
from supervisor.settings import Settings


def _with_manifest(files: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    return {**files, "model.json": json.dumps({**json.loads(files["model.json"]), **changes}).encode()}


PACKAGES = {
    # name -> (files, what the reason must say)
    "garbage.zip": (package_files("garbage", "1", "model.onnx", np.random.default_rng(7).bytes(4096), SSD_LABELS),
                    "onnxruntime cannot load model.onnx: Protobuf parsing failed."),
    # A fixed 64x64 model told to take 65x64: the runtime refuses the warm-up feed.
    "wrongsize.zip": (ssd_files("wrongsize", "1", handler_options={"input_size": [65, 64]}),
                      "warm-up inference failed: Got invalid dimensions for input: image_tensor:0 for the "
                      "following indices index: 2 Got: 65 Expected: 64"),
    "labels.zip": (_with_manifest(ssd_files("labels", "1", hashes=False), labels="names/missing.txt"),
                   "model.json 'labels' names names/missing.txt, which is not in the package"),
}


async def test_reasons_name_package_files_not_device_paths(aiohttp_client, settings: Settings) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    pipeline = client.app[PIPELINE]
    with capture_logs() as logs:
        for name, (files, _) in PACKAGES.items():
            await pipeline.process(write_zip(settings.inbox_dir / name, files), source="inbox")
    rejected = {e["package"]: e["reason"] for e in (await (await client.get("/models")).json())["rejected"]}
    data_dir = str(settings.data_dir)
    for name, (_, expected) in PACKAGES.items():
        reason = rejected[name]
        assert reason == expected
        assert data_dir not in reason and ".tmp-" not in reason and "staging" not in reason
        assert len(reason) <= MAX_REASON
    for entry in settings.quarantine_dir.iterdir():
        assert data_dir not in (entry / REASON_FILE).read_text()
    # The runtime's own words, path and all, stay available to whoever reads the log.
    details = [e["detail"] for e in logs if e["event"] == "package_rejected_detail"]
    assert any("INVALID_PROTOBUF" in d and data_dir in d for d in details), details


def test_a_long_reason_is_cut_at_a_word_and_the_data_dir_never_shows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    text = (f"[Errno 13] Permission denied: '{data}/inbox/x.zip' while reading {data}/models/ssd/2/labels.txt; "
            + "more words " * 40)
    reason = user_reason(text, data)
    assert reason.startswith("[Errno 13] Permission denied: 'x.zip' while reading labels.txt; more words")
    assert len(reason) <= MAX_REASON and reason.endswith("words…") and str(data) not in reason
    assert user_reason(f"see {data}/current", data) == "see <data-dir>/current"
    assert json.dumps(user_reason("short")) == '"short"'
