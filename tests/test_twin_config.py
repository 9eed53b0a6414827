"""A twin configuration the SDK cannot use (a malformed EDGELOADER_CONNECTION_STRING, an unreadable
EDGELOADER_CA_CERT): the twin stays off with one error line, `/models` says why, the model keeps
serving from the drop folder, and nothing restarts in a loop. No secret reaches the log or /models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisor.app import build_app
from supervisor.settings import load_settings
from supervisor.supervise import supervised
from supervisor.twin.connection_string import check_module_connection_string
from supervisor.twin.service import TwinService
from supervisor.twin.status import TwinStatus

KEY = "c2VjcmV0LWtleS1vZi10aGUtZGV2aWNl"  # base64, stands for the device's key
GOOD = f"HostName=hub.azure-devices.net;DeviceId=dev;ModuleId=edgemodelloader;SharedAccessKey={KEY}"


@pytest.mark.parametrize(("text", "words"), [
    ("", "is empty"),
    (f"hub.azure-devices.net;DeviceId=dev;SharedAccessKey={KEY}", "part 1 of 3 is not Key=value"),
    (f"HostName=hub;DeviceId=dev;SharedAccessKey={KEY}", "lacks ModuleId"),
    (f"HostName=hub;DeviceID=dev;ModuleId=m;SharedAccessKey={KEY}", "unknown key 'DeviceID'; did you mean 'DeviceId'?"),
    ("HostName=hub;DeviceId=dev;ModuleId=m;SharedAccessKey=not base64!", "SharedAccessKey that is not base64"),
    ("HostName=hub;DeviceId=dev;ModuleId=m;x509=true", "uses x509"),
])
def test_what_is_wrong_with_a_connection_string_is_named_without_its_secrets(text: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_module_connection_string(text)
    assert words in str(caught.value) and KEY not in str(caught.value) and "not base64!" not in str(caught.value)
    check_module_connection_string(GOOD)


async def _run_for_a_while(service: TwinService, seconds: float = 1.0) -> list[dict[str, object]]:
    with capture_logs() as logs:
        async with supervised("twin-watcher", service.run, base_delay=0.05) as task:
            await asyncio.sleep(seconds)
            assert not task.done(), "the twin service gave up instead of staying off"
    return logs


async def test_a_malformed_connection_string_keeps_the_twin_off_without_a_crash_loop(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path, "connection_string": f"HostName=hub;SharedAccessKey={KEY}"},
                             env={})
    status = TwinStatus()
    logs = await _run_for_a_while(TwinService(settings, None, env={}, status=status))  # type: ignore[arg-type]
    assert [e["event"] for e in logs if e["log_level"] in ("error", "critical")] == ["twin_off"]
    assert not [e for e in logs if e["event"] in ("service_crashed", "service_restarting")]
    assert status.state == "off" and status.mode == "connection-string"
    assert status.reason == ("EDGELOADER_CONNECTION_STRING lacks DeviceId, ModuleId; expected HostName=<hub>"
                             ".azure-devices.net;DeviceId=<device>;ModuleId=<module>;SharedAccessKey=<base64 key>")
    assert KEY not in str(logs)


async def test_an_unreadable_ca_certificate_keeps_the_twin_off(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path, "connection_string": GOOD}, env={})
    status = TwinStatus()
    service = TwinService(settings, None, env={"EDGELOADER_CA_CERT": str(tmp_path / "ca.pem")},  # type: ignore[arg-type]
                          status=status)
    logs = await _run_for_a_while(service)
    assert status.state == "off" and "ca.pem" in (status.reason or "") and "No such file" in (status.reason or "")
    assert not [e for e in logs if e["event"] == "service_crashed"] and KEY not in str(logs)


async def test_models_says_why_the_twin_is_off(aiohttp_client, tmp_path: Path, photo: bytes) -> None:
    bad = f"HostName=hub.azure-devices.net;DeviceId=dev;ModuleId=m;SharedAccessKey={KEY}&se=1"  # pasted with more
    settings = load_settings({"data_dir": tmp_path, "twin": "auto", "connection_string": bad}, env={})
    client = await aiohttp_client(build_app(settings))  # with the folder and twin watchers
    for _ in range(50):
        twin = (await (await client.get("/models")).json())["twin"]
        if twin["state"] == "off":
            break
        await asyncio.sleep(0.05)
    assert twin["state"] == "off" and twin["reason"].startswith("EDGELOADER_CONNECTION_STRING has a SharedAccessKey")
    assert KEY not in str(twin)
    # The model keeps serving.
    resp = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200


async def test_models_says_when_the_twin_is_switched_off(aiohttp_client, tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path, "twin": "off"}, env={})
    client = await aiohttp_client(build_app(settings))
    twin = (await (await client.get("/models")).json())["twin"]
    assert (twin["state"], twin["reason"]) == ("off", "EDGELOADER_TWIN=off")
