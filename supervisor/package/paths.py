"""The one rule for every path a package names, and bounded walks of package folders.

A package (and the version folder it becomes) is untrusted input. Every path it names (the model,
the labels, the manifest's ``files``, the install record's file names) must resolve, without
following symlinks, to a regular file inside the package; anything else rejects the package with a
reason that names the *key*, never the target, so that a rejection cannot be used to learn about
files outside. Walks of a package folder are iterative and capped in depth and in entries (a
folder nested a thousand levels deep must end in quarantine, not in a RecursionError).

No runtime, no event loop, no aiohttp: the watcher, the packer and the CLI import it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

__all__ = [
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "PackageError",
    "UnsafePackage",
    "is_safe_component",
    "member_path",
    "public_reason",
    "safe_name",
    "walk_files",
]

# A real package is one or two folders deep; 16 leaves room for odd exporters.
MAX_DEPTH = 16
# Files and folders a walk looks at before giving up (the file-count limit is far lower).
MAX_ENTRIES = 10_000
# Names a route or a repository folder may carry: one path component, no leading dot.
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
# Python object reprs ("<_io.BytesIO object at 0x7f...>") say nothing to a user and leak addresses.
_OBJECT_REPR = re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>")
# Absolute paths in a runtime's message: the device's folders are nobody's business.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s\"'<>:,;()\[\]]+/)*([^\s\"'<>:,;()\[\]/]*)")
REASON_MAX = 200


class PackageError(ValueError):
    """A package is malformed; the message says what to fix."""


class UnsafePackage(PackageError):
    """A path a package names leaves it, or is not a regular file (the message names the key)."""


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
def safe_name(text: str) -> str:
    """A name usable as one path component: letters, digits, dot, dash, underscore."""
    cleaned = _UNSAFE_CHARS.sub("-", text).strip(".-_")
    return cleaned[:80] or "model"


def is_safe_component(text: str) -> bool:
    """Whether ``text`` is a name usable as one folder name: no slash, no '..', no leading dot."""
    return bool(_SAFE_COMPONENT.match(text))


def member_path(folder: Path, rel: object, key: str) -> str:
    """``rel`` (a name from model.json or an install record) as a normalised relative POSIX path of a
    regular file inside ``folder``, checked component by component with ``lstat`` (no symlink is
    followed, none may be on the way). Raises UnsafePackage naming ``key`` (not the target), or
    PackageError when a name that would lie inside is simply missing."""
    if not isinstance(rel, str) or not rel.strip():
        raise UnsafePackage(f"{key} must be a file name inside the package")
    text = rel.replace("\\", "/")
    pure = PurePosixPath(text)
    if (pure.is_absolute() or text.startswith("/") or re.match(r"^[A-Za-z]:", text)
            or any(part in ("..", "") for part in text.split("/") if part != ".")
            or "\0" in text or len(text) > 1024):
        raise UnsafePackage(f"{key} must name a file inside the package (no absolute path, no '..')")
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise UnsafePackage(f"{key} must be a file name inside the package")
    current = folder
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise PackageError(f"{key} names {_printable('/'.join(parts))}, which is not in the package") from None
        except OSError:
            raise UnsafePackage(f"{key} cannot be read inside the package") from None
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePackage(f"{key} leads through a symlink; a package holds regular files only")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise PackageError(f"{key} names {_printable('/'.join(parts))}, which is not in the package")
        if last and not stat.S_ISREG(st.st_mode):
            raise UnsafePackage(f"{key} is not a regular file")
    return "/".join(parts)


def walk_files(
    folder: Path, *, skip_hidden: bool = False, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES
) -> Iterator[tuple[PurePosixPath, os.stat_result]]:
    """Every non-folder entry under ``folder`` as (relative path, lstat), sorted per folder,
    without following symlinks (a symlink is yielded as one). Iterative; raises UnsafePackage
    when the tree is deeper than ``max_depth`` or holds more than ``max_entries`` entries.
    ``skip_hidden``: leave out dot-names (derived data, never package content)."""
    stack: list[tuple[Path, PurePosixPath, int]] = [(folder, PurePosixPath(), 0)]
    seen = 0
    while stack:
        path, rel, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except NotADirectoryError:
            continue
        subdirs = []
        for entry in entries:
            seen += 1
            if seen > max_entries:
                raise UnsafePackage(f"the package holds more than {max_entries} files and folders")
            if skip_hidden and entry.name.startswith("."):
                continue
            st = entry.stat(follow_symlinks=False)
            child = rel / entry.name
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= max_depth:
                    raise UnsafePackage(f"the package nests folders more than {max_depth} levels deep")
                subdirs.append((Path(entry.path), child, depth + 1))
            else:
                yield child, st
        stack.extend(reversed(subdirs))


def _printable(text: str, limit: int = 80) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def public_reason(text: str, limit: int = REASON_MAX, *, strip_paths: bool = True) -> str:
    """A rejection reason fit to show a user (``/models``, ``reason.json``, the twin): printable
    text only, no object reprs, absolute paths cut to their last component (``strip_paths``), at
    most ``limit`` characters. The full text goes to the log, not here."""
    text = _OBJECT_REPR.sub("<object>", text)
    if strip_paths:
        text = _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", text)
    text = " ".join(text.split())
    return _printable(text, limit)
