"""The mutation runner (scripts/mutants.py, `make mutants`): the mutants it makes, and its list of known
mutants (equivalent, explained), which must name mutants that still exist (or it would excuse nothing,
silently)."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutants_runner", REPO / "scripts" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SOURCE = b'''"""A docstring is never mutated."""
import os

LIMIT = 3


def publish(fd: int, path: str, size: int) -> str | None:
    """Neither is this one."""
    if size > LIMIT and not path.startswith("."):
        os.fsync(fd)
        log.info("published", size=size + 1)
    for _ in range(2):
        if size == 0:
            break
        raise ValueError(f"{size + 1}")
    return path
'''


def test_the_mutants_of_a_small_module() -> None:
    mutants_py = runner()
    mutants = mutants_py.generate("example.py", SOURCE)
    made = {(m.line, m.operator, m.replacement) for m in mutants}
    assert (9, "compare", "(size <= LIMIT)") in made and (9, "compare", "(size >= LIMIT)") in made
    assert (9, "boolop", "(size > LIMIT or not path.startswith('.'))") in made
    assert (9, "negate", "(path.startswith('.'))") in made  # the `not` dropped
    assert (10, "remove-call", "pass") in made
    assert (13, "compare", "(size != 0)") in made and (13, "constant", "(1)") in made
    assert (14, "loop", "continue") in made and (15, "remove-raise", "pass") in made
    assert (16, "return-none", "return None") in made
    lines = {m.line for m in mutants}
    assert not lines & {1, 4, 8, 11}, "docstrings, plain constants and log calls are left alone"
    assert not any(m.line == 15 and m.operator == "arith" for m in mutants), "f-strings are left alone"
    for mutant in mutants:
        mutants_py.apply(mutant, SOURCE)  # each one is valid Python


def test_every_known_mutant_is_a_current_mutant() -> None:
    mutants_py = runner()
    known = tomllib.loads((REPO / "scripts" / "mutants_known.toml").read_text())
    assert set(known) == {"equivalent", "explained"}
    listed = {**known["equivalent"], **known["explained"]}
    assert len(listed) == len(known["equivalent"]) + len(known["explained"]), "an id in both tables"
    current = {m.id for module in mutants_py.TARGETS for m in mutants_py.generate(module)}
    stale = sorted(set(listed) - current)
    assert not stale, f"no such mutant any more (the code moved): update scripts/mutants_known.toml: {stale}"
    assert all(isinstance(reason, str) and len(reason) > 20 for reason in listed.values())
