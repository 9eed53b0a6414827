"""What a package must pass before its model is loaded: checksums from its sender (sidecars or the
twin's intent), archive safety, the manifest and per-file hashes. Blocking functions with no
repository, no runtime and no event loop: the pipeline runs them in its loader thread,
``edgeloader verify`` (updates/verify.py) directly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from handlers.ort_cache import is_runtime_cache
from supervisor.formats import INTENT_SUFFIX, SIDECAR_SUFFIXES
from supervisor.package.archive import ArchiveLimits, unpack_package
from supervisor.package.paths import walk_files
from supervisor.package.reader import (
    Manifest,
    PackageError,
    file_sha256,
    package_file_hashes,
    read_manifest,
    verify_files,
)
from supervisor.package.signature import Trust, check_signature

__all__ = [
    "Intent",
    "check_package_checksums",
    "package_sha256",
    "read_intent",
    "sidecars",
    "stage_package",
]

log = structlog.get_logger(__name__)

# Sidecars are a line of text ("<hex>  <name>") or a small JSON object; anything bigger is refused
# unread rather than kept in memory.
MAX_SIDECAR_BYTES = 4096
MAX_INTENT_BYTES = 65536
_DIGEST_LENGTHS = {".sha256": 64, ".md5": 32}


def package_sha256(path: Path) -> str:
    """SHA-256 of a package: of the file, or of a folder's files (names and bytes, sorted)."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    # Not an optimised-model cache a runtime may have written into the folder: derived data.
    # (Walked iteratively with a depth cap: a folder nested a thousand deep is refused here.)
    for rel, st in sorted(walk_files(path)):
        if stat.S_ISREG(st.st_mode) and not is_runtime_cache(rel):
            # fsencode: a name that is no UTF-8 (surrogate-escaped) hashes as its bytes (found by the fuzzer).
            h.update(os.fsencode(str(rel)) + b"\0" + file_sha256(path / rel).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Intent:
    """What the sender wants done with a package (sidecars beside it; all optional)."""

    source: str
    activate: bool | None = None  # None: as the manifest says
    sha256: str | None = None
    md5: str | None = None
    name: str | None = None
    version: str | None = None


def read_intent(package: Path, source: str) -> Intent:
    """``<pkg>.intent.json`` (written by the twin) or ``<pkg>.sha256`` (beside a dropped package)."""
    intent_path = package.with_name(package.name + INTENT_SUFFIX)
    if _small_regular_file(intent_path, MAX_INTENT_BYTES):
        try:
            raw = json.loads(intent_path.read_text("utf-8"))
            return Intent(
                source=str(raw.get("source", source)),
                activate=raw.get("activate"),
                sha256=raw.get("sha256"),
                md5=raw.get("md5"),
                name=raw.get("name"),
                version=raw.get("version"),
            )
        except (OSError, ValueError, AttributeError):
            log.warning("intent_unreadable", package=package.name)
    sha256 = _sidecar_digest(package, ".sha256")
    if sha256 is not None:
        return Intent(source=source, sha256=sha256)
    md5 = _sidecar_digest(package, ".md5")
    if md5 is not None:
        return Intent(source=source, md5=md5)
    return Intent(source=source)


def _small_regular_file(path: Path, limit: int) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size <= limit


def _sidecar_digest(package: Path, suffix: str) -> str | None:
    """The digest in ``<package><suffix>`` (``sha256sum`` / ``md5sum`` output), None without one.
    Raises PackageError when the sidecar is anything but a small text file holding a digest: its
    content is never echoed (a symlinked sidecar would otherwise show another file's first bytes)."""
    path = package.with_name(package.name + suffix)
    if not (path.exists() or path.is_symlink()):
        return None
    what = f"the {suffix} file beside the package"
    digits = _DIGEST_LENGTHS[suffix]
    if not _small_regular_file(path, MAX_SIDECAR_BYTES):
        raise PackageError(f"{what} must be a small regular file holding {digits} hex digits")
    words = path.read_bytes().split()
    if not words or not re.fullmatch(rb"[0-9A-Fa-f]{%d}" % digits, words[0]):
        raise PackageError(f"{what} does not start with a {digits}-hex-digit checksum")
    return words[0].decode("ascii").lower()


def sidecars(package: Path) -> list[Path]:
    return [package.with_name(package.name + s) for s in SIDECAR_SUFFIXES]


def check_package_checksums(package: Path, sha: str, intent: Intent) -> None:
    """The whole package against the SHA-256 / MD5 its sender gave (sidecar or intent). Blocking."""
    if intent.sha256 and intent.sha256 != sha:
        raise PackageError(f"package SHA-256 is {sha[:12]}…, expected {intent.sha256[:12]}…")
    if intent.md5 and package.is_file():
        md5 = _file_md5(package)
        if md5 != intent.md5:
            raise PackageError(f"package MD5 is {md5}, expected {intent.md5}")


def stage_package(
    package: Path, workdir: Path, limits: ArchiveLimits, intent: Intent, sha: str, trust: Trust | None = None
) -> Manifest:
    """Unpack ``package`` safely into the empty ``workdir``, check its signature against ``trust``
    (signature.py), read its manifest and check every file the manifest lists against its SHA-256.
    Blocking. Raises PackageError with the reason."""
    unpack_package(package, workdir, limits)
    signer, signed_hashes = check_signature(workdir, trust or Trust())
    stem = package.name.split(".")[0] if package.is_file() else package.name
    manifest = read_manifest(workdir, intent.name or stem, intent.version or sha[:12])
    # A verified signature has just hashed every file: its digests are the ones checked.
    hashes = signed_hashes or package_file_hashes(workdir)
    verify_files(workdir, manifest, hashes)
    return dataclasses.replace(manifest, hashes=hashes, signer=signer.to_record() if signer else None)


def _file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
