"""``edgeloader status | activate | rollback`` as a person on site runs them, against a real server on
loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packages import ssd_files, write_zip

from supervisor.app import build_app
from supervisor.http.keys import ENGINE, PIPELINE
from supervisor.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
TOKEN = "on-site-token"


async def edgeloader(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOADER_")}
    env["PYTHONPATH"] = str(REPO)
    if token is not None:
        env["EDGELOADER_API_TOKEN"] = token
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=env,
        timeout=60, cwd=REPO,
    )


@pytest.fixture
async def server(aiohttp_server, tmp_path: Path):
    settings = load_settings({"data_dir": tmp_path, "twin": "off"}, env={"EDGELOADER_API_TOKEN": TOKEN})
    app = build_app(settings, services=False)
    server = await aiohttp_server(app)
    await app[PIPELINE].process(write_zip(tmp_path / "inbox" / "2.zip", ssd_files("tiny-ssd", "2", activate=False)),
                                source="inbox")
    return server


async def test_status_activate_and_rollback(server) -> None:
    url = str(server.make_url("/"))
    status = await edgeloader("status", "--url", url)
    assert status.returncode == 0, status.stderr
    assert "active:   blazeface-short-range 1 (handler mediapipe_ssd" in status.stdout
    assert "tiny-ssd 2  stored" in status.stdout and "twin:" in status.stdout

    refused = await edgeloader("activate", "tiny-ssd", "2", "--url", url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "set EDGELOADER_API_TOKEN" in refused.stderr

    done = await edgeloader("activate", "tiny-ssd", "2", "--url", url, token=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "active: tiny-ssd 2"
    assert server.app[ENGINE].active.info.name == "tiny-ssd"

    back = await edgeloader("rollback", "--url", url, token=TOKEN)
    assert back.returncode == 0 and back.stdout.strip() == "active: blazeface-short-range 1"
    nothing = await edgeloader("rollback", "--url", url, token=TOKEN)
    assert nothing.returncode == 1 and "nothing older to roll back to" in nothing.stderr

    missing = await edgeloader("activate", "tiny-ssd", "9", "--url", url, token=TOKEN)
    assert missing.returncode == 1 and "not in the repository (HTTP 404 not_found)" in missing.stderr

    as_json = await edgeloader("status", "--json", "--url", url)
    assert '"name": "blazeface-short-range"' in as_json.stdout


async def test_clear_errors_and_exit_codes(unused_tcp_port: int) -> None:
    gone = await edgeloader("status", "--url", f"http://127.0.0.1:{unused_tcp_port}")
    assert gone.returncode == 3 and gone.stdout == ""
    assert gone.stderr.startswith("edgeloader status: cannot reach the service at") and gone.stderr.count("\n") == 1
    usage = await edgeloader("activate", "only-a-name")
    assert usage.returncode == 2
    bad_url = await edgeloader("status", "--url", "127.0.0.1:8080")
    assert bad_url.returncode == 2 and "--url must be http://HOST:PORT" in bad_url.stderr


def test_the_remote_commands_load_no_runtime() -> None:
    code = (
        "import sys\n"
        "from supervisor.__main__ import main\n"
        "main(['status', '--url', 'http://127.0.0.1:9'])\n"
        "heavy = {'onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'numpy', 'aiohttp', 'handlers'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
