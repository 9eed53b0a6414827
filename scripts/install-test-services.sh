#!/usr/bin/env bash
# Install the real services the twin and download tests run against:
#   - mosquitto (Debian package): the MQTT broker behind the IoT Hub simulator;
#   - Azurite 3.35.0 (npm, the official Azure Storage emulator) into .tools/node_modules;
# and the browser the status page's test drives:
#   - chromium and chromium-driver (Debian packages, the same version by construction).
# Idempotent and quick when both are present. Nothing is started here: the tests start their own
# instances on loopback addresses and stop them.
#
# Azurite 3.35.0 is the last release that runs on Node 20 (3.37 needs Node >= 22).
set -euo pipefail

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

# -- Chromium (tests/test_status_page_browser.py) -------------------------------------------------------
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium: present"
elif command -v apt-get >/dev/null; then
    echo "chromium: installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null
    fi
else
    echo "install-test-services: no apt-get: install chromium and its chromedriver yourself" >&2
    exit 1
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
