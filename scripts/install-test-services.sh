#!/usr/bin/env bash
# Install the real services and tools the tests run against:
#   - mosquitto (Debian package): the MQTT broker behind the IoT Hub simulator;
#   - Azurite 3.35.0 (npm, the official Azure Storage emulator) into .tools/node_modules;
#   - podman, buildah and debootstrap (Debian packages): the container image test builds the image from a
#     Debian base made with debootstrap and runs it (tests/test_container_image.py);
#   - chromium and chromium-driver (Debian packages, the same version by construction): the browser the
#     status page's test drives (tests/test_status_page_browser.py).
# With --qemu also QEMU user emulation for arm64 (qemu-user-static, binfmt-support), registered with the
# kernel: `make image-test-arm64` needs it, `make test` does not.
# Idempotent and quick when all are present. Nothing is started here: the tests start their own
# instances on loopback addresses and stop them.
#
# Azurite 3.35.0 is the last release that runs on Node 20 (3.37 needs Node >= 22).
set -euo pipefail

QEMU=no
if [ "${1:-}" = "--qemu" ]; then QEMU=yes; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
AZURITE_VERSION="3.35.0"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "install-test-services: need root (or sudo) for: $*" >&2; return 1; fi
}

# -- mosquitto ---------------------------------------------------------------------------------------
if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then
    echo "mosquitto: present"
elif command -v apt-get >/dev/null; then
    echo "mosquitto: installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y --no-install-recommends mosquitto >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root apt-get install -y --no-install-recommends mosquitto >/dev/null
    fi
    # Debian's package may start a system broker on port 1883; the tests use their own instances.
else
    echo "install-test-services: no apt-get: install mosquitto yourself (e.g. brew install mosquitto)" >&2
    exit 1
fi

# -- Debian packages: apt-get install what is missing (an update first only if the install fails) --------
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "install-test-services: no apt-get: install $* yourself" >&2
        return 1
    fi
    echo "$*: installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

# -- podman, buildah, debootstrap ----------------------------------------------------------------------
missing_pkgs=()
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing_pkgs+=("$tool")
done
if [ ${#missing_pkgs[@]} -eq 0 ]; then
    echo "podman, buildah, debootstrap: present"
else
    apt_install "${missing_pkgs[@]}"
fi

# -- QEMU user emulation for arm64 (--qemu) -----------------------------------------------------------
if [ "$QEMU" = yes ] && [ "$(uname -m)" != aarch64 ]; then
    if ! [ -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
        apt_install qemu-user-static binfmt-support
    fi
    # Without systemd nothing registers the interpreters at boot: mount binfmt_misc and enable it here.
    if ! [ -e /proc/sys/fs/binfmt_misc/register ]; then
        as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if ! [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        as_root update-binfmts --enable qemu-aarch64
    fi
    echo "qemu-aarch64: $(head -n 1 /proc/sys/fs/binfmt_misc/qemu-aarch64)"
fi

# -- Chromium (tests/test_status_page_browser.py) -------------------------------------------------------
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium: present"
else
    apt_install chromium chromium-driver
fi

# -- Azurite ------------------------------------------------------------------------------------------
installed_version() {
    node -e "console.log(require('$TOOLS/node_modules/azurite/package.json').version)" 2>/dev/null || true
}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "install-test-services: Node.js (>= 18) and npm are needed for Azurite" >&2
    exit 1
fi
if [ "$(installed_version)" = "$AZURITE_VERSION" ] && [ -x "$TOOLS/node_modules/.bin/azurite-blob" ]; then
    echo "azurite: $AZURITE_VERSION present"
else
    echo "azurite: installing $AZURITE_VERSION into $TOOLS"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --silent "azurite@$AZURITE_VERSION"
fi

"$TOOLS/node_modules/.bin/azurite-blob" --version >/dev/null
echo "test services ready: $(command -v mosquitto || echo /usr/sbin/mosquitto), $TOOLS/node_modules/.bin/azurite-blob, /usr/bin/chromium"
