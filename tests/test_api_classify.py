"""POST /classify on an installed image classifier, and each task's route refusing the other's model."""

from __future__ import annotations

import io
from pathlib import Path

import modelgen
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from packages import package_files, write_zip
from PIL import Image

from supervisor.app import build_app
from supervisor.http.keys import PIPELINE
from supervisor.settings import load_settings

NAMES = [f"class-{i}" for i in range(1000)]


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return buf.getvalue()


def expected_top(colour: tuple[int, int, int], k: int) -> list[int]:
    """Output rows of the generated TFLite classifier (1001, row 0 background), likeliest first."""
    w, b = modelgen.classifier_weights(1001)
    logits = (np.asarray(colour, np.float64) - 128.0) * 0.0078125 @ w.T.astype(np.float64) + b
    logits[0] = -np.inf
    return [int(i) for i in np.argsort(-logits)[:k]]


@pytest.fixture
async def client(aiohttp_client, tmp_path: Path) -> TestClient:
    settings = load_settings({"data_dir": tmp_path / "data", "twin": "off"}, env={})
    return await aiohttp_client(build_app(settings, services=False))


async def install_classifier(client: TestClient, tmp_path: Path) -> None:
    model = modelgen.classifier_tflite(tmp_path / "mobilenet.tflite", size=32, quantized="uint8").read_bytes()
    # 1000 names for 1001 outputs, as TF's MobileNets and an ImageNet labels file without "background".
    files = package_files("mobilenet", "2", "mobilenet.tflite", model, "\n".join(NAMES) + "\n")
    app: web.Application = client.app  # type: ignore[assignment]
    installed = await app[PIPELINE].process(write_zip(tmp_path / "mobilenet.zip", files), "test")
    assert installed is not None


async def test_classify_answers_the_top_k_labels_of_the_image(client: TestClient, tmp_path: Path) -> None:
    await install_classifier(client, tmp_path)
    colour = (200, 30, 90)
    resp = await client.post("/classify", data=png(colour), headers={"Content-Type": "image/png"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["model"] == {"name": "mobilenet", "version": "2"} and body["image"] == {"width": 64, "height": 48}
    top = expected_top(colour, 5)
    assert [c["class_id"] for c in body["classes"]] == top
    assert [c["label"] for c in body["classes"]] == [NAMES[i - 1] for i in top]  # row 0 is the background
    scores = [c["score"] for c in body["classes"]]
    assert scores == sorted(scores, reverse=True) and 0.0 < scores[-1] <= scores[0] <= 1.0
    assert set(body["timing_ms"]) == {"decode", "preprocess", "inference", "postprocess"}
    resp = await client.post("/classify?k=2", data=png(colour), headers={"Content-Type": "image/png"})
    assert [c["class_id"] for c in (await resp.json())["classes"]] == top[:2]


async def test_each_route_refuses_the_other_tasks_model_with_409(client: TestClient, tmp_path: Path) -> None:
    # The bundled face detector is active: /classify is the wrong door.
    resp = await client.post("/classify", data=png((1, 2, 3)), headers={"Content-Type": "image/png"})
    body = await resp.json()
    assert resp.status == 409 and body["error"]["code"] == "conflict"
    assert "object detector" in body["error"]["message"] and "POST /detect" in body["error"]["message"]
    await install_classifier(client, tmp_path)
    for route in ("/detect", "/score"):
        resp = await client.post(route, data=png((1, 2, 3)), headers={"Content-Type": "image/png"})
        body = await resp.json()
        assert resp.status == 409, route
        assert "'mobilenet'" in body["error"]["message"] and "image classifier" in body["error"]["message"]
        assert "POST /classify" in body["error"]["message"]


@pytest.mark.parametrize("k", ["0", "-1", "two", ""])
async def test_bad_k_is_a_bad_request(client: TestClient, k: str) -> None:
    resp = await client.post(f"/classify?k={k}", data=png((1, 2, 3)), headers={"Content-Type": "image/png"})
    assert resp.status == 400 and "'k'" in (await resp.json())["error"]["message"]


async def test_metadata_and_models_say_the_task(client: TestClient, tmp_path: Path) -> None:
    meta = await (await client.get("/v2/models/blazeface-short-range")).json()
    assert meta["task"] == "detect" and meta["handler"] == "mediapipe_ssd"
    await install_classifier(client, tmp_path)
    meta = await (await client.get("/v2/models/mobilenet")).json()
    assert meta["task"] == "classify" and meta["handler"] == "classifier"
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "UINT8", "shape": [1, 1001]}]
    listing = await (await client.get("/models")).json()
    assert listing["active"]["task"] == "classify"
    tasks = {(v["name"], v["state"]): v["task"] for v in listing["versions"]}
    assert tasks == {("mobilenet", "active"): "classify", ("blazeface-short-range", "previous"): "detect"}
