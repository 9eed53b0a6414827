"""pytest plugin for scripts/mutants.py: which test runs which line of the modules being mutated.

Loaded with ``-p _mutants_trace`` (scripts/ on PYTHONPATH) in the unmutated run. ``MUTANTS_TRACE_FILES``
names the modules (absolute paths, ``os.pathsep``-separated); ``MUTANTS_TRACE_OUT`` is where the result
goes: ``{"lines": {file: {line: [test ids]}}, "seconds": {test id: duration}}``. Lines run while no test
is running (at import, during collection) are credited to ``"*"``: every test. Tracing starts when
pytest imports this plugin, before any conftest.py; threads started after that (worker pools,
``asyncio.to_thread``) are traced too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import defaultdict
from types import FrameType
from typing import Any

import pytest

_FILES = frozenset(p for p in os.environ.get("MUTANTS_TRACE_FILES", "").split(os.pathsep) if p)
_lines: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
_seconds: dict[str, float] = defaultdict(float)
_current = "*"


def _local(frame: FrameType, event: str, _arg: Any) -> Any:
    if event == "line":
        _lines[frame.f_code.co_filename][frame.f_lineno].add(_current)
    return _local


def _global(frame: FrameType, _event: str, _arg: Any) -> Any:
    if frame.f_code.co_filename in _FILES:
        _lines[frame.f_code.co_filename][frame.f_lineno].add(_current)
        return _local
    return None


# From this plugin's import on (before conftest.py imports the modules): their import-time lines count.
sys.settrace(_global)
threading.settrace(_global)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    global _current
    _current = item.nodeid
    yield
    _current = "*"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[report.nodeid] += report.duration


def pytest_unconfigure(config: pytest.Config) -> None:
    sys.settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
    out = os.environ.get("MUTANTS_TRACE_OUT")
    if out:
        lines = {f: {str(n): sorted(ids) for n, ids in by_line.items()} for f, by_line in _lines.items()}
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"lines": lines, "seconds": _seconds}, f)
