"""The optional API token, against the real app and the bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from supervisor.app import build_app
from supervisor.settings import load_settings

TOKEN = "s3cret-token-for-tests"


async def _client(aiohttp_client, tmp_path: Path, scope: str) -> TestClient:
    env = {"EDGELOADER_API_TOKEN": TOKEN, "EDGELOADER_API_TOKEN_SCOPE": scope}
    settings = load_settings({"data_dir": tmp_path, "twin": "off"}, env=env)
    return await aiohttp_client(build_app(settings, services=False))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_admin_scope_guards_model_switching_only(aiohttp_client, tmp_path: Path, photo: bytes) -> None:
    client = await _client(aiohttp_client, tmp_path, "admin")
    detect = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    assert detect.status == 200 and (await detect.json())["detections"]
    assert (await client.get("/models")).status == 200

    for headers in ({}, _bearer("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        for path in ("/models/rollback", "/models/blazeface-short-range/1/activate"):
            resp = await client.post(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"]["code"] == "unauthorized"

    # With the token the request reaches the route: the bundled model is already active.
    resp = await client.post("/models/blazeface-short-range/1/activate", headers=_bearer(TOKEN))
    assert resp.status == 200, await resp.text()


async def test_all_scope_guards_everything_but_health(aiohttp_client, tmp_path: Path, photo: bytes) -> None:
    client = await _client(aiohttp_client, tmp_path, "all")
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert (await client.get(path)).status == 200, path
    for path in ("/models", "/openapi.json", "/v2/models/blazeface-short-range"):
        assert (await client.get(path)).status == 401, path
    refused = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg"})
    assert refused.status == 401
    allowed = await client.post("/detect", data=photo, headers={"Content-Type": "image/jpeg", **_bearer(TOKEN)})
    assert allowed.status == 200 and (await allowed.json())["detections"]


def test_the_token_stays_out_of_settings_repr_and_a_bad_scope_is_refused(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": tmp_path}, env={"EDGELOADER_API_TOKEN": TOKEN})
    assert settings.api_token == TOKEN and settings.api_token_scope == "admin"
    assert TOKEN not in repr(settings)
    with pytest.raises(ValueError, match=r"EDGELOADER_API_TOKEN_SCOPE.*admin, all.*'everything'"):
        load_settings({"data_dir": tmp_path}, env={"EDGELOADER_API_TOKEN": TOKEN,
                                                   "EDGELOADER_API_TOKEN_SCOPE": "everything"})


def test_a_setting_that_is_not_a_number_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rescan_seconds \(EDGELOADER_RESCAN_SECONDS\) must be a number of "
                                         r"seconds above 0, not 'abc'"):
        load_settings({"data_dir": tmp_path}, env={"EDGELOADER_RESCAN_SECONDS": "abc"})
    with pytest.raises(ValueError, match=r"port \(EDGELOADER_PORT\) must be a port number from 0 to 65535, not '80a'"):
        load_settings({"data_dir": tmp_path}, env={"EDGELOADER_PORT": "80a"})


def test_the_middleware_refuses_a_scope_it_does_not_know() -> None:
    """Settings check the scope; the middleware checks it again, so that a caller building it directly
    with a typo ('Admin', 'everything') gets an error instead of an API with no protected route."""
    from supervisor.http.auth import token_middleware

    for scope in ("admin", "all"):
        token_middleware(TOKEN, scope)
    with pytest.raises(ValueError, match=r"api_token_scope must be one of admin, all, not 'Admin'"):
        token_middleware(TOKEN, "Admin")
