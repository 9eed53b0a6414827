"""Unpacking a package safely: zip or folder -> a plain folder, refusing anything dangerous.

Refused: absolute paths and ``..`` (zip-slip), symlinks, device files and other non-regular
entries, too many files, too many bytes unpacked, and a compression ratio typical of zip bombs.
Sizes are checked while the bytes are written, not only from the (forgeable) zip header.

Free space is checked before anything is written, and a write that fails on a full disk raises
``DiskFull`` (the device's condition), never a PackageError (the package's defect).
"""

from __future__ import annotations

import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from supervisor.diskspace import DiskFull, ensure_room, is_disk_full
from supervisor.package.paths import PackageError, walk_files

__all__ = ["ArchiveLimits", "is_complete_zip", "unpack_package"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int = 64
    max_bytes: int = 1_000_000_000
    max_ratio: float = 200.0


def is_complete_zip(path: Path) -> bool:
    """True when the zip's central directory is readable (a zip still being copied is not)."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
        return True
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    except (ValueError, struct.error, NotImplementedError):
        return True  # its end is there but zipfile refuses it: the pipeline says why


def _safe_member_path(name: str) -> PurePosixPath:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"unsafe path in archive: {name!r} is absolute")
    if ".." in pure.parts:
        raise PackageError(f"unsafe path in archive: {name!r} leaves the package folder")
    return pure


def _strip_common_root(names: list[PurePosixPath]) -> int:
    """How many leading folders all members share (zips made of a folder have one)."""
    if not names:
        return 0
    first = names[0].parts
    depth = 0
    while depth < len(first) - 1 and all(len(n.parts) > depth + 1 and n.parts[depth] == first[depth] for n in names):
        depth += 1
    return depth


def _unpack_zip(path: Path, dest: Path, limits: ArchiveLimits) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise PackageError("not a valid zip file (truncated, or not a zip at all)") from exc
    except (ValueError, EOFError, struct.error, NotImplementedError) as exc:
        # A central directory zipfile chokes on: a name flagged UTF-8 that is not (UnicodeDecodeError,
        # found by the fuzzer), a forged field.
        raise PackageError(f"the zip's directory cannot be read: {type(exc).__name__}") from exc
    from handlers.ort_cache import is_runtime_cache  # here: the watcher imports this module, not runtimes

    with zf:
        if any(not i.filename for i in zf.infolist()):  # zipfile's is_dir() fails on one (IndexError)
            raise PackageError("archive holds an entry without a name")
        # An optimised-model cache is derived per device (handlers/runtimes.py): never taken in.
        members = [i for i in zf.infolist() if not i.is_dir()
                   and not is_runtime_cache(PurePosixPath(i.filename.replace("\\", "/")))]
        if len(members) > limits.max_files:
            raise PackageError(f"archive holds {len(members)} files; the limit is {limits.max_files}")
        for info in members:
            mode = info.external_attr >> 16
            if mode and not (stat.S_ISREG(mode) or mode & 0o170000 == 0):
                kind = "symlink" if stat.S_ISLNK(mode) else "special file"
                raise PackageError(f"archive entry {info.filename!r} is a {kind}; only regular files are allowed")
        paths = [_safe_member_path(i.filename) for i in members]
        strip = _strip_common_root(paths)
        declared = sum(i.file_size for i in members)
        compressed = sum(i.compress_size for i in members) or 1
        if declared > limits.max_bytes:
            raise PackageError(f"archive unpacks to {declared} bytes; the limit is {limits.max_bytes}")
        if declared / compressed > limits.max_ratio and declared > 1_000_000:
            raise PackageError(
                f"compression ratio {declared / compressed:.0f}:1 is over {limits.max_ratio:.0f}:1 (zip bomb?)"
            )
        ensure_room(dest, declared, "unpack the package")
        written = 0
        for info, rel in zip(members, paths, strict=True):
            target = dest.joinpath(*rel.parts[strip:])
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, target.open("xb") as out:
                    while block := src.read(_CHUNK):
                        written += len(block)
                        if written > limits.max_bytes or written > compressed * limits.max_ratio + 1_000_000:
                            raise PackageError("archive unpacks to more than its header says (zip bomb?)")
                        out.write(block)
            except FileExistsError as exc:
                raise PackageError(f"archive holds {info.filename!r} twice") from exc
            except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
                if is_disk_full(exc):
                    raise DiskFull(f"the disk filled up while unpacking {info.filename!r}",
                                   needed=declared) from exc
                raise PackageError(f"archive entry {info.filename!r} is corrupt: {exc}") from exc
            except NotImplementedError as exc:  # a compression method zipfile lacks (deflate64...)
                # Before RuntimeError, of which it is a subclass (that clause caught it first).
                raise PackageError(f"archive entry {info.filename!r}: {exc}; zip it with deflate") from exc
            except RuntimeError as exc:  # zipfile's "File is encrypted, password required"
                raise PackageError(f"archive entry {info.filename!r} cannot be read: {exc}") from exc


def _copy_folder(src: Path, dest: Path, limits: ArchiveLimits) -> None:
    from handlers.ort_cache import is_runtime_cache  # here: the watcher imports this module, not runtimes

    files: list[PurePosixPath] = []
    total = 0
    # Iterative and depth-capped (walk_files): a folder nested a thousand deep is refused, not a
    # RecursionError. Only regular files with one link are taken: a symlink or a hard link could
    # bring in a file from outside the package (a hard link to /etc/shadow looks like a file).
    for rel, st in walk_files(src, max_entries=max(limits.max_files * 4, 256)):
        if is_runtime_cache(rel):  # derived per device: never taken in
            continue
        if stat.S_ISLNK(st.st_mode):
            raise PackageError(f"{_shown(rel)} is a symlink; only regular files are allowed")
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{_shown(rel)} is a special file; only regular files are allowed")
        if st.st_nlink > 1:
            raise PackageError(f"{_shown(rel)} is a hard link; copy the file into the package instead")
        files.append(rel)
        total += st.st_size
        if len(files) > limits.max_files:
            raise PackageError(f"package folder holds more than {limits.max_files} files; the limit is "
                               f"{limits.max_files}")
        if total > limits.max_bytes:
            raise PackageError(f"package folder holds more than {limits.max_bytes} bytes; the limit is "
                               f"{limits.max_bytes}")
    ensure_room(dest, total, "copy the package")
    for rel in files:
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.joinpath(*rel.parts), target, follow_symlinks=False)


def _shown(rel: PurePosixPath) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(rel))
    return text if len(text) <= 80 else text[:79] + "…"


def unpack_package(source: Path, dest: Path, limits: ArchiveLimits) -> None:
    """Unpack a zip, copy a folder, or take a bare model file, into the empty folder ``dest``."""
    if source.is_dir():
        _copy_folder(source, dest, limits)
    elif source.suffix.lower() in (".onnx", ".tflite"):
        ensure_room(dest, source.stat().st_size, "copy the model")
        shutil.copyfile(source, dest / source.name)
    elif source.stat().st_size == 0:
        raise PackageError("the package file is empty")
    else:
        _unpack_zip(source, dest, limits)
