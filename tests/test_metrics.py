"""``/metrics`` against the real app: it parses as Prometheus text, and its counters move with requests,
swaps, rollbacks, rejected packages and downloads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient
from packages import bad_package, ssd_files, write_zip
from prometheus_client.parser import text_string_to_metric_families

from supervisor.app import build_app
from supervisor.http.keys import PIPELINE
from supervisor.http.observe import reason_kind
from supervisor.metrics import Metrics
from supervisor.settings import Settings
from supervisor.twin.download import Download
from supervisor.twin.partfile import resume_note_path

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        assert family.name.startswith("edgeloader_"), family.name
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


async def test_requests_and_detection_stages_are_counted(aiohttp_client, settings: Settings, photo: bytes) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    before = await scrape(client)
    for _ in range(2):
        resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
        assert resp.status == 200
    assert (await client.post("/detect", data=b"not an image", headers={"Content-Type": "image/jpeg"})).status == 400
    assert (await client.get("/no/such/route")).status == 404
    after = await scrape(client)

    def moved(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert moved("edgeloader_http_requests_total", method="POST", route="/detect", status="200") == 2
    assert moved("edgeloader_http_requests_total", method="POST", route="/detect", status="400") == 1
    assert moved("edgeloader_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert moved("edgeloader_http_request_duration_seconds_count", method="POST", route="/detect") == 3
    for stage in ("decode", "preprocess", "inference", "postprocess"):
        assert moved("edgeloader_detect_stage_duration_seconds_count", stage=stage) == 2, stage
        assert value(after, "edgeloader_detect_stage_duration_seconds_sum", stage=stage) > 0
    # The scrape being answered is the one request in flight.
    assert value(after, "edgeloader_http_requests_in_flight") == 1
    # No twin service in this app (services=False): it never started.
    assert value(after, "edgeloader_twin_state", state="starting") == 1
    assert sum(v for k, v in after.items() if k[0] == "edgeloader_twin_state") == 1
    assert value(after, "edgeloader_twin_connected") == 0
    [(info, one)] = [(dict(k[1]), v) for k, v in after.items() if k[0] == "edgeloader_active_model_info"]
    assert one == 1 and len(info["sha256"]) == 64
    assert (info["name"], info["version"], info["handler"], info["labels"]) == ("blazeface-short-range", "1",
                                                                                  "mediapipe_ssd", "1")


async def test_swaps_rollbacks_loads_and_rejections_are_counted(
    aiohttp_client, settings: Settings, tmp_path: Path
) -> None:
    client: TestClient = await aiohttp_client(build_app(settings, services=False))
    start = await scrape(client)
    assert value(start, "edgeloader_model_swaps_total", source="startup") == 1
    assert value(start, "edgeloader_model_loads_total", result="ok") == 1
    assert value(start, "edgeloader_model_load_duration_seconds_count") == 1

    pipeline = client.app[PIPELINE]
    await pipeline.process(write_zip(settings.inbox_dir / "2.zip", ssd_files("tiny-ssd", "2")), source="inbox")
    assert (await client.post("/models/blazeface-short-range/1/activate")).status == 200
    assert (await client.post("/models/rollback")).status == 200
    bad, _ = bad_package("manifest-checksum", settings.inbox_dir)
    await pipeline.process(bad, source="inbox")
    after = await scrape(client)

    assert value(after, "edgeloader_model_swaps_total", source="inbox") == 1
    assert value(after, "edgeloader_model_swaps_total", source="api") == 2  # the activation and the rollback
    assert value(after, "edgeloader_model_rollbacks_total", source="api") == 1
    assert value(after, "edgeloader_model_loads_total", result="ok") == 4
    assert value(after, "edgeloader_packages_quarantined_total", reason="checksum") == 1
    assert any(k[0] == "edgeloader_active_model_info" and ("name", "tiny-ssd") in k[1] for k in after)


async def test_each_app_has_its_own_registry(aiohttp_client, settings: Settings, tmp_path: Path, photo: bytes) -> None:
    from supervisor.settings import load_settings

    one: TestClient = await aiohttp_client(build_app(settings, services=False))
    other_settings = load_settings({"data_dir": tmp_path / "other", "twin": "off"}, env={})
    other: TestClient = await aiohttp_client(build_app(other_settings))  # with its twin service: off
    await one.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    detect = {"method": "POST", "route": "/detect", "status": "200"}
    assert value(await scrape(one), "edgeloader_http_requests_total", **detect) == 1
    others = await scrape(other)
    assert value(others, "edgeloader_http_requests_total", **detect) == 0
    assert value(others, "edgeloader_twin_state", state="off") == 1


def test_reason_kinds() -> None:
    assert reason_kind("checksum mismatch for labels.txt: manifest ab…, file cd…") == "checksum"
    assert reason_kind("package SHA-256 is 0123…, expected abcd…") == "checksum"
    assert reason_kind("unsafe path in archive: '../evil.txt' leaves the package folder") == "unsafe_path"
    assert reason_kind("archive unpacks to more than its header says (zip bomb?)") == "too_large"
    assert reason_kind("not a valid zip file (truncated, or not a zip at all)") == "archive"
    assert reason_kind("unknown key 'score_treshold'; did you mean 'score_threshold'?") == "manifest"
    assert reason_kind("no labels: add labels.txt") == "labels"
    assert reason_kind("cannot load model.onnx: Protobuf parsing failed") == "model"
    assert reason_kind("something new") == "other" and reason_kind(None) == "other"


async def test_download_bytes_fetched_reused_and_resumes(aiohttp_server, tmp_path: Path) -> None:
    """A download that continues an interrupted one counts the kept bytes as reused, the rest as fetched."""
    blob = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB
    served = tmp_path / "served.zip"
    served.write_bytes(blob)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(served)  # Range, If-Range and ETag as a blob store answers them

    app = web.Application()
    app.router.add_get("/pkg.zip", handler)
    server = await aiohttp_server(app)
    url = str(server.make_url("/pkg.zip"))
    metrics = Metrics()
    part = tmp_path / "staging" / "pkg.zip.part"
    part.parent.mkdir()
    sha = hashlib.sha256(blob).hexdigest()

    first = Download(url, part, expected_length=len(blob), sha256=sha, counters=metrics)
    result = await first.run()
    assert result.size == len(blob)
    assert metrics.download_bytes.labels("fetched")._value.get() == len(blob)

    # As an interrupted run leaves it: the first 50,000 bytes and the resume note with the blob's ETag.
    kept = 50_000
    part.write_bytes(blob[:kept])
    note = {"identity": {"blob": url, "sha256": sha, "length": len(blob)}, "etag": first.etag, "total": len(blob)}
    resume_note_path(part).write_text(json.dumps(note))
    second = Download(url, part, expected_length=len(blob), sha256=sha, counters=metrics)
    await second.run()
    assert second.resumed_bytes == kept
    assert metrics.download_bytes.labels("reused")._value.get() == kept
    assert metrics.download_bytes.labels("fetched")._value.get() == 2 * len(blob) - kept
    assert metrics.download_resumes._value.get() == 1
