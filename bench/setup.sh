#!/usr/bin/env bash
# Benchmark set-up (idempotent): bench-only tools into the project venv, wrk from Debian, and the
# benchmark models and images built into bench/.cache (outside git). bench/run.py calls this
# itself when the cache is missing; `bash bench/setup.sh` can also be run by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { echo "bench/setup.sh: $PY missing: run 'make setup' first" >&2; exit 1; }

# torch only to build (export) the ONNX model. Pin the CPU build: a plain 'torch' would pull the
# multi-GB CUDA one.
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
# The hand-rolled baseline of bench/sidebyside.py (Flask + OpenCV), bench-only: not in the image.
"$PY" -c 'import flask, cv2' 2>/dev/null || "$PY" -m pip install --quiet flask opencv-python-headless
# Profilers for looking into a missed target (docs/performance.md says how).
"$PY" -c 'import pyinstrument' 2>/dev/null || "$PY" -m pip install --quiet pyinstrument
test -x "$(dirname "$PY")/py-spy" || "$PY" -m pip install --quiet py-spy

# wrk: the HTTP load generator (C, epoll; one thread is plenty here).
if ! command -v wrk >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi

# Models (random weights, real architectures), packages and images: only what is missing.
"$PY" bench/models.py --out bench/.cache
