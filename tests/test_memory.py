"""The service pins glibc's mmap threshold so that memory freed by a model swap goes back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from supervisor.memory import MMAP_THRESHOLD_BYTES, pin_mmap_threshold

# Free a 16 MiB buffer twice, as a swap frees a model's weights, and print how much RSS stayed.
_PROBE = """
import sys
import numpy as np
from supervisor.memory import pin_mmap_threshold

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

if sys.argv[1] == "pin":
    assert pin_mmap_threshold() is not None
base = rss_kb()
for _ in range(3):
    block = np.ones(2 * 1024 * 1024)  # 16 MiB, every page touched
    del block
print(rss_kb() - base)
"""


def _kept_kb(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}  # no MALLOC_* from the caller
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_model_sized_buffers_go_back_to_the_os() -> None:
    # Control: glibc's default keeps the freed block (its dynamic threshold rose past 16 MiB).
    assert _kept_kb("default") > 12 * 1024
    assert _kept_kb("pin") < 4 * 1024


def test_an_operator_setting_is_left_alone() -> None:
    assert pin_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "131072"}) is None
    if platform.libc_ver()[0] == "glibc":
        assert pin_mmap_threshold({}) == MMAP_THRESHOLD_BYTES
