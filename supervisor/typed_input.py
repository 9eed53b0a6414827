"""One-line messages for what users type: model.json, settings, handler options, twin properties.

The inputs are described by pydantic models; this module turns a ``ValidationError`` into one line
that names the field (as the user wrote it: a JSON key, an environment variable, a flag), says the
form expected, shows what was given (never for a secret), and for an unknown key suggests the
nearest valid one (``difflib``). Dependency-free apart from pydantic.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

__all__ = ["describe_errors", "nearest", "unknown_key"]

# Error types whose meaning is the form expected, whatever the field.
_FORMS = {
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "text (a JSON string)",
    "dict_type": "an object",
    "list_type": "a list",
    "tuple_type": "a list",
    "path_type": "a path",
}
_BOUNDS = {
    "greater_than": ("above", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("below", "lt"),
    "less_than_equal": ("at most", "le"),
}
_MAX_SHOWN = 60
# Names pydantic gives union branches in an error's location (e.g. ('version', 'str')).
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "tuple", "dict", "none", "lax-or-strict",
                        "json-or-python", "constrained-str", "constrained-int", "constrained-float"})


def nearest(word: str, choices: Collection[str]) -> str | None:
    """The valid name closest to a mistyped one, if any is close enough to be a likely typo."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not matches:  # case slips ("filename" for "FileName") are typos too
        lowered = {c.lower(): c for c in choices}
        matches = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)]
    return matches[0] if matches else None


def unknown_key(key: str, choices: Collection[str], what: str = "key", where: str = "") -> str:
    """'unknown key 'min_scor'; did you mean 'min_score'?' (or the valid names when none is close)."""
    hint = nearest(key, choices)
    if hint is not None:
        return f"unknown {what} {key!r}{where}; did you mean {hint!r}?"
    valid = ", ".join(sorted(choices)) or "none"
    return f"unknown {what} {key!r}{where}; valid: {valid}"


def _shown(value: Any, note_text: bool = True) -> str:
    text = repr(value)
    if note_text and isinstance(value, str):
        text += " (text)" if value.strip().lstrip("-").replace(".", "", 1).isdigit() else ""
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _sentence(error: ErrorDetails, label: str, form: str | None, secret: bool, note_text: bool) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = "" if secret else f", not {_shown(error.get('input'), note_text)}"
    if kind == "missing" and form is None:
        return f"{label} is required"
    if form is not None:
        return f"{label} must be {form}{given}"
    if kind in _FORMS:
        return f"{label} must be {_FORMS[kind]}{given}"
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        return f"{label} must be {words} {ctx.get(key)}{given}"
    if kind == "literal_error":
        return f"{label} must be {ctx.get('expected')}{given}"
    if kind == "string_pattern_mismatch":
        return f"{label} has the wrong form{given}"
    if kind == "form":  # our own validators: the message is the form
        return f"{label} must be {error['msg']}{given}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{label}: {message[:1].lower()}{message[1:]}{given}"


def describe_errors(
    exc: ValidationError,
    *,
    known: Collection[str],
    label: Callable[[str], str] = lambda name: repr(name),
    forms: Mapping[str, str] | None = None,
    secrets: Collection[str] = (),
    what: str = "key",
    where: str = "",
    note_text: bool = True,
) -> str:
    """One line for a ValidationError of a flat model (nested keys are named as ``a.b``).

    ``known``: the valid top-level names (for suggestions); ``label``: how a field is named to the
    user; ``forms``: the expected form of fields whose errors would read poorly (unions, ranges);
    ``secrets``: fields whose value is never shown; ``where``: appended to 'unknown key ...'
    (e.g. " in handler_options"); ``note_text``: mark text that looks like a number ('320' (text)),
    off where every value is text (environment variables)."""
    parts: list[str] = []
    seen: set[str] = set()
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        if not loc:
            parts.append(error["msg"])
            continue
        field = loc[0]
        if error["type"] == "extra_forbidden":
            if len(loc) == 1:
                parts.append(unknown_key(field, known, what, where))
            else:
                parts.append(f"unknown {what} {'.'.join(loc)!r}")
            continue
        if field in seen:  # a union reports each branch: one sentence per field is enough
            continue
        seen.add(field)
        # Keys inside a mapping (files.<name>) are the user's; tags of union branches are not.
        inner = [p for p in loc[1:] if not p.startswith(("function-", "tagged-union")) and p not in _TYPE_TAGS]
        form = (forms or {}).get(field)
        name = label(field) if not inner or form else f"{label(field)}.{'.'.join(inner)}"
        parts.append(_sentence(error, name, form, field in secrets, note_text))
    return "; ".join(dict.fromkeys(parts))
