#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 from Debian's own packages, for building
# docker/Dockerfile where Docker Hub's python:3.11-slim-bookworm cannot be pulled (the tests; an
# offline mirror). The same Python (3.11.2) and the same glibc as the official slim image.
#
#   scripts/bookworm-base.sh [--arch amd64|arm64] IMAGE
#
# Cached: an IMAGE already in podman's store is kept as it is (delete it with `podman rmi IMAGE` to make
# it again). The first run takes a few minutes (debootstrap downloads ~60 MB of packages); later runs
# return at once. Needs root, podman and debootstrap (scripts/install-test-services.sh installs them),
# and for a foreign --arch QEMU user emulation (mk/deploy.mk's image-test-arm64 sets it up).
set -euo pipefail

ARCH=amd64
if [ "${1:-}" = "--arch" ]; then ARCH="$2"; shift 2; fi
IMAGE="${1:?usage: bookworm-base.sh [--arch amd64|arm64] IMAGE}"

if podman image exists "$IMAGE"; then
    echo "bookworm-base: $IMAGE present"
    exit 0
fi

# The mirror apt uses on this machine (a local mirror or proxy is often the only one reachable).
MIRROR="$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $1; exit}')"
if [ -z "$MIRROR" ]; then
    MIRROR="$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

WORK="$(mktemp -d /var/tmp/bookworm-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
started=$SECONDS
echo "bookworm-base: debootstrap $ARCH from $MIRROR (a few minutes)"
debootstrap --arch="$ARCH" --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

# As in the official image: `python` on PATH, and no package caches or documentation.
ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*

# Where TLS to the package index passes through a proxy whose CA only this machine's bundle holds,
# pip inside the build needs that bundle (elsewhere it is Debian's own, and this changes nothing).
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntimeout = 180\n' >"$ROOTFS/etc/pip.conf"
fi

tar -C "$ROOTFS" --numeric-owner -c . | podman import --quiet --arch "$ARCH" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "bookworm-base: $IMAGE made in $((SECONDS - started)) s"
