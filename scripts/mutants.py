#!/usr/bin/env python3
"""Mutation testing of the safety-critical modules: does the test suite notice when the code is broken?

Each target module is parsed with ``ast`` and small breakages ("mutants") are made of it, one at a time:

    compare     a comparison flipped (< into >=, == into !=, in into not in) or moved by one (< into <=)
    boolop      ``and`` into ``or`` and back
    negate      an ``if``/``while``/conditional expression's test negated, a ``not`` dropped
    remove-call a call made for its effect removed (``os.fsync(fd)``, ``await self._restart()``)
    remove-raise  a ``raise`` removed (a check that no longer refuses)
    constant    a whole number moved by one, ``True``/``False`` swapped
    return-none ``return <value>`` into ``return None``
    loop        ``break`` into ``continue`` and back
    arith       ``+``/``-`` swapped (in ``x += n`` too)

Log calls, docstrings, annotations and f-strings are left alone. Each mutant is written into a private
copy of the tree (one per job, the original file put back after each run) and the module's tests run
there (``pytest -x``, the files mapped in TARGETS) with a time limit. A mutant is *killed* when a test
fails, *survived* when they all pass, *timeout* when it runs past the limit (a hang is noticed too, but
slowly). ``scripts/mutants_known.toml`` lists, with the reason, the mutants no behaviour can tell from
the original (``[equivalent]``: counted apart, not run) and the survivors no deterministic test can
reach (``[explained]``: run, and counted as explained survivors); the run exits 1 while another
survivor remains. docs/testing.md has the figures.

    make mutants                          every target, one job
    python scripts/mutants.py --module supervisor/fsutil.py --jobs 2
    python scripts/mutants.py --list      the mutants, without running anything

It prints a table per module and writes every mutant with its outcome to ``build/mutants.json``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOWN_FILE = ROOT / "scripts" / "mutants_known.toml"

# Module -> the test files that should notice a breakage in it, the quickest and most pointed first
# (pytest -x stops at the first failure).
TARGETS: dict[str, list[str]] = {
    "supervisor/package/paths.py": ["tests/test_holes.py", "tests/test_archive.py", "tests/test_repository.py",
                                    "tests/test_bad_packages.py", "tests/test_pipeline.py", "tests/test_inputs.py",
                                    "tests/test_watcher.py", "tests/test_packcli.py"],
    "supervisor/package/archive.py": ["tests/test_archive.py", "tests/test_bad_packages.py", "tests/test_holes.py",
                                      "tests/test_onnx_cache.py", "tests/test_pipeline.py", "tests/test_watcher.py"],
    "supervisor/package/checks.py": ["tests/test_bad_packages.py", "tests/test_late_sidecar.py",
                                     "tests/test_holes.py", "tests/test_hash_once.py", "tests/test_pipeline.py"],
    "supervisor/package/manifest.py": ["tests/test_inputs.py", "tests/test_bad_packages.py", "tests/test_holes.py",
                                       "tests/test_package_formats.py", "tests/test_pipeline.py",
                                       "tests/test_reasons.py", "tests/test_packcli.py"],
    "supervisor/updates/pipeline.py": ["tests/test_pipeline.py", "tests/test_warmup.py", "tests/test_retire.py",
                                       "tests/test_durability.py", "tests/test_bad_packages.py",
                                       "tests/test_late_sidecar.py", "tests/test_repository.py", "tests/test_holes.py",
                                       "tests/test_reasons.py", "tests/test_api.py", "tests/test_watcher.py",
                                       "tests/test_twin.py"],
    "supervisor/updates/repository.py": ["tests/test_repository.py", "tests/test_durability.py",
                                         "tests/test_holes.py", "tests/test_pipeline.py", "tests/test_warmup.py"],
    "supervisor/updates/watcher.py": ["tests/test_watcher.py", "tests/test_late_sidecar.py", "tests/test_holes.py",
                                      "tests/test_twin.py"],
    "supervisor/twin/download.py": ["tests/test_resume_protections.py", "tests/test_download.py",
                                    "tests/test_durability.py", "tests/test_redact.py", "tests/test_twin.py"],
    "supervisor/twin/partfile.py": ["tests/test_durability.py", "tests/test_resume_protections.py",
                                    "tests/test_download.py", "tests/test_watcher.py", "tests/test_twin.py"],
    "supervisor/twin/reconcile.py": ["tests/test_twin.py"],
    "supervisor/serving/engine.py": ["tests/test_retire.py", "tests/test_warmup.py", "tests/test_api.py",
                                     "tests/test_holes.py", "tests/test_pipeline.py", "tests/test_inputs.py",
                                     "tests/test_swap_under_load.py"],
    "supervisor/fsutil.py": ["tests/test_durability.py", "tests/test_repository.py", "tests/test_pipeline.py",
                             "tests/test_holes.py::test_remove_tree_takes_what_shutil_rmtree_cannot"],
    "supervisor/redact.py": ["tests/test_redact.py", "tests/test_download.py", "tests/test_twin.py"],
    "supervisor/http/auth.py": ["tests/test_auth.py", "tests/test_api.py"],
}

_FLIP = {ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE, ast.GtE: ast.Lt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_BOUNDARY = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_BOUNDS = (ast.Compare, ast.AugAssign, ast.Return, ast.UnaryOp)
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
# Copied into each job's tree: everything but what is big, built, or a cache.
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", ".mypy_cache", ".ruff_cache",
                                     "*.egg-info", "build", "dist", ".ort-cache", "node_modules", ".pytest_cache")


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    col: int
    end_line: int
    end_col: int
    operator: str
    original: str
    replacement: str

    @property
    def id(self) -> str:
        digest = hashlib.sha1(self.replacement.encode()).hexdigest()[:6]
        return f"{self.module}:{self.line}:{self.col}:{self.operator}:{digest}"


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timeout, equivalent, error
    seconds: float
    detail: str = ""
    explained: bool = False  # a survivor whose reason is in scripts/mutants_known.toml [explained]


# -- generating -----------------------------------------------------------------------------------------


def _is_log_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    if node.func.attr not in _LOG_METHODS:
        return False
    owner = ast.unparse(node.func.value)
    return owner.split(".")[-1].lstrip("_") in ("log", "logger", "_log") or owner.endswith("log")


def _is_docstring(node: ast.stmt, parent: ast.AST) -> bool:
    body = getattr(parent, "body", None)
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and isinstance(body, list) and bool(body) and body[0] is node)


class _Finder(ast.NodeVisitor):
    """Collects (node, operator, replacement text) for every mutation point."""

    def __init__(self) -> None:
        self.points: list[tuple[ast.AST, str, str]] = []

    def add(self, node: ast.AST, operator: str, replacement: ast.AST | str, wrap: bool = True) -> None:
        text = replacement if isinstance(replacement, str) else ast.unparse(replacement)
        self.points.append((node, operator, f"({text})" if wrap else text))

    # Parts never mutated: annotations, f-strings, log calls, docstrings, `if TYPE_CHECKING:`.
    def visit_arg(self, node: ast.arg) -> None:
        return

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for default in [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]:
            self.visit(default)
        self._body(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._body(node)

    def visit_Module(self, node: ast.Module) -> None:
        self._body(node)

    def _body(self, parent: ast.AST) -> None:
        for stmt in getattr(parent, "body", []):
            if _is_docstring(stmt, parent):
                continue
            names = [t.id for t in getattr(stmt, "targets", []) if isinstance(t, ast.Name)]
            if "__all__" in names:
                continue
            self.visit(stmt)

    def negate(self, test: ast.expr) -> None:
        # A single comparison is flipped by "compare", a `not` dropped by visit_UnaryOp: no third copy.
        single = isinstance(test, ast.Compare) and len(test.ops) == 1
        constant = isinstance(test, ast.Constant)
        if not (single or constant or (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not))):
            self.add(test, "negate", f"not ({ast.unparse(test)})")

    def visit_If(self, node: ast.If) -> None:
        if ast.unparse(node.test) == "TYPE_CHECKING":
            return
        self.negate(node.test)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self.negate(node.test)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.negate(node.test)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(node, "negate", node.operand)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            for table in (_FLIP, _BOUNDARY):
                if type(op) in table:
                    changed = copy.deepcopy(node)
                    changed.ops[i] = table[type(op)]()
                    self.add(node, "compare", changed)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        changed = copy.deepcopy(node)
        changed.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(node, "boolop", changed)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        strings = any(isinstance(side, ast.JoinedStr)
                      or (isinstance(side, ast.Constant) and isinstance(side.value, str))
                      for side in (node.left, node.right))
        if isinstance(node.op, ast.Add | ast.Sub) and not strings:
            changed = copy.deepcopy(node)
            changed.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self.add(node, "arith", changed)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.Add | ast.Sub):
            changed = copy.deepcopy(node)
            changed.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self.add(node, "arith", changed, wrap=False)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(node, "constant", repr(not value))
        elif isinstance(value, int) and isinstance(getattr(node, "parent", None), _BOUNDS):
            # Numbers that bound something (compared, counted, returned). Sizes and limits built with
            # arithmetic or passed as arguments (1 << 20, chunk sizes, timeouts) change speed more often
            # than behaviour, and their comparisons are mutated already.
            for moved in (value + 1, value - 1):
                if moved >= 0 or value < 0:
                    self.add(node, "constant", repr(moved))

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.add(node, "return-none", "return None", wrap=False)
        self.generic_visit(node)

    def visit_Break(self, node: ast.Break) -> None:
        self.add(node, "loop", "continue", wrap=False)

    def visit_Continue(self, node: ast.Continue) -> None:
        self.add(node, "loop", "break", wrap=False)

    def visit_Raise(self, node: ast.Raise) -> None:
        if node.exc is not None:
            self.add(node, "remove-raise", "pass", wrap=False)
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        call = node.value.value if isinstance(node.value, ast.Await) else node.value
        if isinstance(call, ast.Call):
            if _is_log_call(call):
                return
            self.add(node, "remove-call", "pass", wrap=False)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if not _is_log_call(node):
            self.generic_visit(node)


def _line_offsets(data: bytes) -> list[int]:
    offsets = [0]
    for i, byte in enumerate(data):
        if byte == 0x0A:
            offsets.append(i + 1)
    return offsets


def generate(module: str, data: bytes | None = None) -> list[Mutant]:
    """Every mutant of ``module`` (a path relative to the repository; ``data``: its source, read from
    there unless given), in source order."""
    data = (ROOT / module).read_bytes() if data is None else data
    tree = ast.parse(data, module)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent  # type: ignore[attr-defined]
    finder = _Finder()
    finder.visit(tree)
    starts = _line_offsets(data)
    mutants: dict[str, Mutant] = {}
    for node, operator, replacement in finder.points:
        a = starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
        b = starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]
        original = data[a:b].decode()
        mutant = Mutant(module, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,  # type: ignore[attr-defined]
                        operator, original, replacement)
        if replacement.strip("()") != original.strip("()"):
            mutants.setdefault(mutant.id, mutant)
    return sorted(mutants.values(), key=lambda m: (m.line, m.col, m.operator, m.replacement))


def apply(mutant: Mutant, source: bytes) -> bytes:
    starts = _line_offsets(source)
    a = starts[mutant.line - 1] + mutant.col
    b = starts[mutant.end_line - 1] + mutant.end_col
    assert source[a:b].decode() == mutant.original, f"{mutant.id}: the source moved"
    changed = source[:a] + mutant.replacement.encode() + source[b:]
    compile(changed, mutant.module, "exec")  # a mutant must be valid Python
    return changed


# -- running --------------------------------------------------------------------------------------------


class Tree:
    """A private copy of the repository for one job, and the zygote that runs its tests."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="edgeloader-mutants-"))
        shutil.copytree(ROOT, self.path / "repo", ignore=_NOT_COPIED, symlinks=True)
        self.repo = self.path / "repo"
        self.zygote = Zygote()

    def remove(self) -> None:
        self.zygote.close()
        # rm, not shutil.rmtree: a test leaves a folder nested a thousand deep, past Python's recursion limit.
        subprocess.run(["rm", "-rf", str(self.path)], check=False)


PLUGINS = ["-p", "pytest_asyncio.plugin", "-p", "pytest_aiohttp.plugin", "-p", "pytest_timeout"]
# Imported once by the zygote (below), before it forks a pytest per mutant: third-party only, never the
# project's own modules (those must be imported afresh, mutated, in each child).
# (Not the pytest plugins: pytest warns that it cannot rewrite the asserts of one imported before it.)
PRELOAD = ["pytest", "aiohttp", "aiohttp.web",
           "aiohttp.test_utils", "numpy", "onnx", "onnx.helper", "onnxruntime", "PIL.Image", "structlog",
           "pydantic", "pydantic_settings", "watchfiles", "azure.iot.device", "paho.mqtt.client", "cryptography.x509",
           "skimage.data", "jsonschema", "ai_edge_litert.interpreter"]
_ZYGOTE = r"""
import importlib, json, os, sys
sys.dont_write_bytecode = True
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
import pytest
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.path[:0] = job["path"]
        try:
            code = int(pytest.main(job["args"]))
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """A process that has imported the heavy third-party modules once and forks a pytest run per request:
    a fresh interpreter per mutant spent about two seconds on imports (onnx alone 0.8 s) before any test."""

    def __init__(self) -> None:
        self.current: int | None = None  # the pytest running now
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, json.dumps(PRELOAD)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def run(self, job: dict[str, object], timeout: float) -> tuple[int | None, float]:
        """(exit code or None on timeout, seconds) of one forked pytest."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        started = time.monotonic()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self.current = json.loads(self.proc.stdout.readline())["pid"]
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(pid)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            code = int(json.loads(self.proc.stdout.readline())["code"])
        finally:
            timer.cancel()
            self.current = None
        return (None if expired.is_set() else code), time.monotonic() - started

    def close(self) -> None:
        """Stop: the pytest it runs now, if any (interrupted), then the zygote itself."""
        if self.current is not None:
            _kill_group(self.current)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_tests(tree: Tree, tests: list[str], timeout: float, trace: list[Path] | None = None,
              trace_out: Path | None = None) -> tuple[str, float, str]:
    """(status, seconds, detail) of ``pytest -x`` on ``tests`` in ``tree``. Only the plugins the suite
    uses are loaded (others installed in the environment cost a second per run); ``trace``: the modules
    whose lines are traced per test (_mutants_trace.py), into ``trace_out``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELOADER_", "PYTEST_ADDOPTS"))}
    env.update(PYTHONPATH=os.pathsep.join([str(tree.repo), str(tree.repo / "scripts")]),
               PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    # Its own temporary root: no numbered folders shared with other pytest sessions on the machine.
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rfEs", f"--basetemp={tree.path / 'tmp'}",
            *PLUGINS]
    if trace:
        env.update(MUTANTS_TRACE_FILES=os.pathsep.join(map(str, trace)), MUTANTS_TRACE_OUT=str(trace_out))
        args += ["-p", "_mutants_trace"]
    log = tree.path / "pytest.log"
    job = {"cwd": str(tree.repo), "env": env, "path": [str(tree.repo), str(tree.repo / "scripts")],
           "args": [*args, *tests], "log": str(log)}
    code, seconds = tree.zygote.run(job, timeout)
    if code is None:
        return "timeout", seconds, ""
    out = log.read_text(errors="replace")
    failed = next((line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if code == 0:
        skipped = re.search(r"(\d+) skipped", summary)
        return "survived", seconds, f"{skipped.group(1)} skipped" if skipped else ""
    # A test failed, the tests could not even be collected (an import broke), or pytest itself could not
    # go on (an internal error, an exception escaping it: the module exits at import...). The unmutated
    # tests passed in the same tree, so the mutant is what they noticed. (A failed test may also leave
    # something unclosed that pytest reports as an error of its own, with another exit code.)
    if code in (1, 2, 3) or failed:
        return "killed", seconds, (failed or summary)[:200]
    return "error", seconds, (failed or summary)[:200]  # usage error, nothing collected: the runner's fault


@dataclass
class Coverage:
    """Which test runs which line, from one traced run of the unmutated tests."""

    lines: dict[str, dict[int, list[str]]]  # module (relative) -> line -> test ids ("*": all)
    seconds: dict[str, float]  # test id -> duration, in the order the tests ran

    def tests_for(self, mutant: Mutant, files: list[str]) -> list[str]:
        """The tests, among ``files``, that run a line of ``mutant`` (all of ``files`` for import-time code)."""
        by_line = self.lines.get(mutant.module, {})
        ids: set[str] = set()
        for line in range(mutant.line, mutant.end_line + 1):
            ids.update(by_line.get(line, ()))
        if "*" in ids:
            return list(files)
        order = {test: i for i, test in enumerate(self.seconds)}
        return sorted((t for t in ids if t.split("::", 1)[0] in files), key=lambda t: order.get(t, len(order)))

    def cost(self, tests: list[str]) -> float:
        if any("::" not in t for t in tests):
            return sum(d for t, d in self.seconds.items() if t.split("::", 1)[0] in tests)
        return sum(self.seconds.get(t, 0.0) for t in tests)


def traced_baseline(modules: list[str], trees: queue.Queue[Tree]) -> Coverage:
    """Run the mapped tests of ``modules`` once, unmutated and traced. They must all pass, none skipped."""
    tests = list(dict.fromkeys(t for m in modules for t in TARGETS[m]))
    tree = trees.get()
    out = tree.path / "trace.json"
    try:
        status, seconds, detail = run_tests(tree, tests, 3600, [tree.repo / m for m in modules], out)
        raw = json.loads(out.read_text()) if out.is_file() else {"lines": {}, "seconds": {}}
    finally:
        trees.put(tree)
    if status != "survived" or detail:
        raise SystemExit(f"the unmutated tests do not pass cleanly ({status} {detail}): {' '.join(tests)}\n"
                         "(are mosquitto and Azurite installed? make services)")
    print(f"unmutated tests: {len(raw['seconds'])} passed in {seconds:.0f} s (traced)", flush=True)
    prefix = str(tree.repo) + os.sep
    lines = {f.removeprefix(prefix): {int(n): ids for n, ids in by_line.items()} for f, by_line in raw["lines"].items()}
    return Coverage(lines, dict(raw["seconds"]))


def mutate_and_run(mutant: Mutant, tests: list[str], timeout: float, trees: queue.Queue[Tree]) -> Outcome:
    tree = trees.get()
    target = tree.repo / mutant.module
    original = target.read_bytes()
    try:
        target.write_bytes(apply(mutant, original))
        status, seconds, detail = run_tests(tree, tests, timeout)
    finally:
        target.write_bytes(original)
        trees.put(tree)
    return Outcome(mutant, status, round(seconds, 1), detail)


def load_known() -> tuple[dict[str, str], dict[str, str]]:
    """(equivalent, explained) from scripts/mutants_known.toml: mutant id -> why."""
    if not KNOWN_FILE.is_file():
        return {}, {}
    with KNOWN_FILE.open("rb") as f:
        known = tomllib.load(f)
    return dict(known.get("equivalent", {})), dict(known.get("explained", {}))


@dataclass
class Tally:
    mutants: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("killed", "timeout", "equivalent", "survived", "explained", "error"), 0))

    def add(self, outcome: Outcome) -> None:
        self.mutants += 1
        self.counts[outcome.status] += 1
        if outcome.explained:
            self.counts["explained"] += 1

    def row(self, name: str) -> str:
        c = self.counts
        scored = self.mutants - c["equivalent"]
        score = 100.0 * (c["killed"] + c["timeout"]) / scored if scored else 100.0
        return (f"{name:<36} {self.mutants:>7} {c['killed']:>7} {c['timeout']:>7} {c['equivalent']:>10} "
                f"{c['survived']:>8} {c['explained']:>9} {c['error']:>5} {score:>6.1f}%")


HEADER = (f"{'module':<36} {'mutants':>7} {'killed':>7} {'timeout':>7} {'equivalent':>10} {'survived':>8} "
          f"{'explained':>9} {'error':>5} {'score':>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", metavar="PATH", choices=sorted(TARGETS),
                        help="a target module (repeatable); default: all of them")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N mutants per module (spread over it)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own tree (default 1)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="seconds per mutant (default: 3x its tests' unmutated time + 30, at least 60)")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "mutants.json", help="where to write the results")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--again", type=Path, metavar="JSON",
                        help="run only the mutants that survived (or errored) in this earlier report")
    args = parser.parse_args(argv)

    again: set[str] | None = None
    if args.again is not None:
        earlier = json.loads(args.again.read_text())["mutants"]
        again = {m["id"] for m in earlier if m["status"] in ("survived", "error")}
    modules = args.module or list(TARGETS)
    plan: dict[str, list[Mutant]] = {}
    for module in modules:
        mutants = [m for m in generate(module) if again is None or m.id in again]
        if not mutants:
            continue
        if args.limit is not None and len(mutants) > args.limit:
            step = len(mutants) / args.limit
            mutants = [mutants[int(i * step)] for i in range(args.limit)]
        plan[module] = mutants
    if args.list:
        for mutants in plan.values():
            for m in mutants:
                print(f"{m.id}  {m.original!r} -> {m.replacement!r}")
        print(f"{sum(len(m) for m in plan.values())} mutants", file=sys.stderr)
        return 0

    equivalents, explanations = load_known()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: cleaned up, reported
    trees: queue.Queue[Tree] = queue.Queue()
    all_trees = [Tree() for _ in range(max(1, args.jobs))]
    for tree in all_trees:
        trees.put(tree)
    stopping = threading.Event()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    total = sum(len(m) for m in plan.values())
    started = time.monotonic()
    marks = {"killed": ".", "timeout": "T", "equivalent": "=", "survived": "S", "error": "E"}
    try:
        coverage = traced_baseline(list(plan), trees)

        def one(mutant: Mutant) -> Outcome | None:
            if stopping.is_set():
                return None
            files = TARGETS[mutant.module]
            tests = coverage.tests_for(mutant, files)
            if mutant.id in equivalents:
                outcome = Outcome(mutant, "equivalent", 0.0, equivalents[mutant.id])
            elif not tests:
                outcome = Outcome(mutant, "survived", 0.0, "no test runs this line")
            else:
                timeout = args.timeout or max(60.0, 3 * coverage.cost(tests) + 30)
                try:
                    outcome = mutate_and_run(mutant, tests, timeout, trees)
                except Exception:
                    if stopping.is_set():  # its zygote was stopped under it
                        return None
                    raise
            if stopping.is_set():
                return None  # cut short by the interruption: no outcome
            if outcome.status == "survived" and mutant.id in explanations:
                outcome.explained, outcome.detail = True, explanations[mutant.id]
            with lock:
                outcomes.append(outcome)
                print(f"[{len(outcomes):>4}/{total}] {marks[outcome.status]} {outcome.status:<10} "
                      f"{outcome.seconds:>5.1f}s {len(tests):>3} tests  {mutant.id}  {mutant.original[:40]!r} -> "
                      f"{mutant.replacement[:40]!r}", flush=True)
            return outcome

        # Waited for a second at a time: a signal (Ctrl-C, SIGTERM) stops the run between two waits.
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            pending = {pool.submit(one, m) for mutants in plan.values() for m in mutants}
            try:
                while pending:
                    done, pending = wait(pending, timeout=1.0)
                    for future in done:
                        future.result()
            finally:
                for future in pending:
                    future.cancel()
                stopping.set()
                for tree in all_trees:
                    tree.zygote.close()  # ends the pytest of a mutant in flight: its thread moves on
    except KeyboardInterrupt:
        print("\ninterrupted: the results so far follow", flush=True)
    finally:
        for tree in all_trees:
            try:
                tree.remove()
            except Exception as exc:  # never at the cost of the report
                print(f"could not remove {tree.path}: {exc}", file=sys.stderr)

    tallies: dict[str, Tally] = {}
    for outcome in outcomes:
        tallies.setdefault(outcome.mutant.module, Tally()).add(outcome)
    overall = Tally()
    for outcome in outcomes:
        overall.add(outcome)
    print("\n" + HEADER)
    for module in plan:
        if module in tallies:
            print(tallies[module].row(module))
    print(overall.row("all"))
    elapsed = time.monotonic() - started
    survivors = [o for o in outcomes if o.status in ("survived", "error") and not o.explained]
    if survivors:
        print("\nsurvivors (kill them with a test, or say why in scripts/mutants_known.toml):")
        for o in sorted(survivors, key=lambda o: (o.mutant.module, o.mutant.line)):
            print(f"  {o.mutant.id}  {o.mutant.original[:70]!r} -> {o.mutant.replacement[:70]!r} {o.detail}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "elapsed_seconds": round(elapsed),
        "totals": {"mutants": overall.mutants, **overall.counts},
        "modules": {m: {"mutants": t.mutants, **t.counts} for m, t in tallies.items()},
        "mutants": [{**asdict(o.mutant), "id": o.mutant.id, "status": o.status, "seconds": o.seconds,
                     "detail": o.detail, "explained": o.explained} for o in outcomes],
    }
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{overall.mutants} mutants in {elapsed / 60:.1f} min; results in {args.json}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
