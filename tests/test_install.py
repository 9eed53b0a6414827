"""The image, without Docker: the steps of docker/Dockerfile, run here.

Build the wheel from exactly what the builder stage copies, install it (not editable) into a fresh virtual
environment the way the builder does, then start the installed ``edgeloader`` the way the container does
(ENTRYPOINT + CMD, the image's ENV plus the deployment manifest's env, a non-root uid, no IoT Edge
environment), detect a face in a real photo, run the image's HEALTHCHECK command, and stop it with SIGTERM
as ``docker stop`` and the IoT Edge agent do: it must exit 0 within 5 s.

It needs the package index (pip installs the dependencies, from its cache when it can): about 20 s warm.
A missing tool skips it, or fails it when env ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_deployment import (
    MODULE,
    REPO,
    TEMPLATE,
    env_of,
    exec_form,
    healthcheck_command,
    instructions,
    missing,
    parse_dockerfile,
)

pytestmark = pytest.mark.timeout(400)

_, RUNTIME = parse_dockerfile()
SERVICE_UID = int(instructions(RUNTIME, "USER")[0].split(":")[0])  # the image's user, when the test runs as root

START_TIMEOUT_S = 90.0
STOP_BUDGET_S = 5.0


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(url: str, body: bytes | None = None, content_type: str = "image/jpeg") -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def root() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is private to the current user (0700) and the service runs as
    # another uid when the test runs as root.
    path = Path(tempfile.mkdtemp(prefix="edgeloader-install-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def usable_by_anyone(path: Path) -> bool:
    """Whether another uid can run this interpreter (every parent directory searchable by others)."""
    path = path.resolve()
    return os.access(path, os.X_OK) and path.stat().st_mode & 0o001 != 0 and all(
        parent.stat().st_mode & 0o001 for parent in path.parents)


def base_python(as_root: bool) -> str:
    """The interpreter the new venv is made from: this one, unless the service's uid could not run it
    (e.g. pyenv under /root, which is 0700); then another Python 3.11, like the image's."""
    ours = Path(getattr(sys, "_base_executable", sys.executable))
    if not as_root or (usable_by_anyone(ours) and usable_by_anyone(Path(sys.base_prefix) / "lib")):
        return str(ours)
    for candidate in ("/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if Path(candidate).exists() and usable_by_anyone(Path(candidate)):
            return candidate
    missing(f"no Python 3.11 that uid {SERVICE_UID} can run ({ours} is private to root)")


def build_and_install(root: Path, as_root: bool) -> Path:
    """The builder stage: copy its COPY sources, `pip wheel`, install the wheel into a new venv."""
    builder, _ = parse_dockerfile()
    src = root / "src"
    src.mkdir()
    for args in instructions(builder, "COPY"):
        for name in args.split()[:-1]:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(root / "wheels"), "."], cwd=src)
    (wheel,) = (root / "wheels").glob("edge_model_loader-*.whl")
    venv = root / "venv"
    run([base_python(as_root), "-m", "venv", "--without-pip", str(venv)])
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", str(wheel)])
    return venv


def test_installed_wheel_serves_like_the_container(root: Path, photo: bytes) -> None:
    """``photo`` (conftest): scikit-image's astronaut as a JPEG, one face."""
    runtime = RUNTIME
    as_root = os.geteuid() == 0
    venv = build_and_install(root, as_root)

    # A real install: the package and its bundled model live in the venv, not in this checkout.
    where = run([str(venv / "bin" / "python"), "-c",
                 "import supervisor, pathlib; print(pathlib.Path(supervisor.__file__).parent)"], cwd=root)
    package_dir = Path(where.stdout.strip())
    assert package_dir.is_relative_to(venv), package_dir
    assert (package_dir / "bundled" / "blazeface-short-range" / "face_detection_short_range.tflite").is_file()
    assert not list(venv.glob("lib/python*/site-packages/__editable__*"))

    data, home = root / "storage", root / "home"
    data.mkdir()
    home.mkdir()
    uid = SERVICE_UID if as_root else os.geteuid()
    if as_root:
        # What the docs tell operators to do with the host directory bound to /iotedge/storage.
        for path in (data, home):
            os.chown(path, SERVICE_UID, SERVICE_UID)

    port = free_port()
    manifest = json.loads(TEMPLATE.read_text())
    manifest_env = manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][MODULE]["env"]
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in env_of(runtime).items() if k.startswith(("EDGELOADER_", "PYTHON"))})
    env.update({k: str(v["value"]) for k, v in manifest_env.items()})
    # Only what cannot be the same outside a container: the paths and a free loopback port.
    env.update(EDGELOADER_DATA_DIR=str(data), EDGELOADER_PORT=str(port), EDGELOADER_HOST="127.0.0.1")
    assert not any(k.startswith("IOTEDGE_") for k in env), "no IoT Edge environment: the twin stays standalone"

    (entrypoint,) = instructions(runtime, "ENTRYPOINT")
    (cmd,) = instructions(runtime, "CMD")
    argv = exec_form(entrypoint) + exec_form(cmd)
    stdout_path, stderr_path = root / "stdout.log", root / "stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        service = subprocess.Popen(
            argv, cwd=home, env=env, stdout=stdout, stderr=stderr,
            **({"user": SERVICE_UID, "group": SERVICE_UID, "extra_groups": []} if as_root else {}),
        )

    def logs() -> str:
        return f"stdout:\n{stdout_path.read_text()[-6000:]}\nstderr:\n{stderr_path.read_text()[-6000:]}"

    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert service.poll() is None, f"edgeloader exited with {service.returncode} while starting\n{logs()}"
            assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S} s\n{logs()}"
            try:
                if http(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)

        # The image's HEALTHCHECK, verbatim, with the container's environment.
        health = subprocess.run(healthcheck_command(runtime), env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr.decode()

        status, result = http(f"{base}/detect", photo)
        assert status == 200, result
        bundled = json.loads((REPO / "supervisor" / "bundled" / "blazeface-short-range" / "model.json").read_text())
        assert result["model"]["name"] == bundled["name"]
        assert result["image"] == {"width": 512, "height": 512}
        (face,) = result["detections"]
        assert face["label"] == "face" and face["score"] >= 0.5
        box = face["box"]
        # The astronaut's face is around x 180-270, y 75-170 in the 512x512 photo.
        assert 150 < (box["xmin"] + box["xmax"]) / 2 < 300 and 50 < (box["ymin"] + box["ymax"]) / 2 < 200, box

        # The status page's template, style and script are package data: the wheel must carry them.
        with urllib.request.urlopen(f"{base}/", timeout=30) as response:
            page = response.read().decode()
        assert "Try the model" in page and "sessionStorage" in page and bundled["name"] in page

        # The non-root service could write its repository into the bound storage.
        written = list(data.iterdir())
        assert written, "nothing written to the data directory"
        assert all(p.lstat().st_uid == uid for p in written)
    finally:
        if service.poll() is None:
            started = time.monotonic()
            service.send_signal(signal.SIGTERM)
            try:
                code = service.wait(timeout=STOP_BUDGET_S + 10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
                raise AssertionError(f"still running {STOP_BUDGET_S + 10} s after SIGTERM\n{logs()}") from None
            stopped_in = time.monotonic() - started
        else:
            code, stopped_in = service.returncode, 0.0

    assert code == 0, f"exit status {code} after SIGTERM\n{logs()}"
    assert stopped_in < STOP_BUDGET_S, f"SIGTERM took {stopped_in:.1f} s (docker kills after 10 s)\n{logs()}"

    # EDGELOADER_LOG_FORMAT=json from the manifest: one JSON object per line on stdout.
    lines = [line for line in stdout_path.read_text().splitlines() if line.strip()]
    assert lines, logs()
    for line in lines:
        assert isinstance(json.loads(line), dict), line

    # And the HEALTHCHECK does report a dead service.
    dead = subprocess.run(healthcheck_command(runtime), env=env, capture_output=True, timeout=30)
    assert dead.returncode != 0
