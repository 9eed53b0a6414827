"""The on-disk cache of optimised ONNX models (see ``handlers.runtimes.OnnxRuntime`` for why).

A folder beside the model file holds, per device and per onnxruntime version, the model as
onnxruntime's ORT_ENABLE_ALL graph optimisations leave it. It is derived data: package hashing and
unpacking skip it (``is_runtime_cache``), so a package never brings one in nor changes hash because
one was written. This module knows the cache's names, key and housekeeping; runtimes.py builds and
loads the sessions.
"""

from __future__ import annotations

import hashlib
import platform
import re
import time
import uuid
from pathlib import Path, PurePath

import structlog

__all__ = ["OPTIMIZED_CACHE_DIR", "cache_path", "data_name", "is_runtime_cache", "new_work_dir", "remove_stale",
           "remove_tree", "unlink_quietly"]

log = structlog.get_logger(__name__)

OPTIMIZED_CACHE_DIR = ".ort-cache"
# Models (with their sidecars) smaller than this are not cached: their load peak is a few MB.
_CACHE_MIN_BYTES = 1 << 20
# Bump when the cache's content or key changes meaning.
_CACHE_FORMAT = "2"
# Not ".onnx": package.py finds the model of a package as its one *.onnx / *.tflite file.
_CACHE_SUFFIX = ".ortopt"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 600.0


def is_runtime_cache(relative: PurePath) -> bool:
    """True for a path (relative to a package or version folder) inside an optimised-model cache."""
    return OPTIMIZED_CACHE_DIR in relative.parts


def data_name(graph_name: str, nonce: str) -> str:
    """The external-data file of a cached graph: named after the graph and the temporary folder
    it was written in, so that each written graph names weights of its own."""
    return f"{graph_name}.{nonce.removeprefix(_TMP_PREFIX)}.data"


def _cpu_fingerprint() -> str:
    """What the optimised graph depends on besides the model: the CPU's ISA extensions."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                # x86: "flags"; Arm: "Features". The first processor's line is enough.
                if line.startswith(("flags", "Features")):
                    text = line.split(":", 1)[-1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{text or platform.processor()}"


def cache_path(model: Path, ort_version: str, content_key: str | None = None) -> Path | None:
    """Where the optimised copy of ``model`` for this device and onnxruntime lives, or None when
    the model is too small to be worth caching or its folder cannot be read. ``content_key``: a
    digest of the folder's files the caller already holds (the install's one hashing pass); without
    it the files are read and hashed here."""
    folder = model.parent
    try:
        # The model and every file beside it, not only the model: external-data sidecars can
        # have any name, and onnx (to read their names from the model) is not a runtime
        # dependency. Not hidden ones: the repository's install record and activation marker
        # are written into a version after its first load (and packages are packed without).
        beside = sorted(
            p for p in folder.rglob("*")
            if p != model and p.is_file() and not p.is_symlink()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        files = [model, *beside]
        if sum(f.stat().st_size for f in files) < _CACHE_MIN_BYTES:
            return None
        h = hashlib.sha256()
        h.update(f"{_CACHE_FORMAT}|{ort_version}|{_cpu_fingerprint()}".encode())
        if content_key is not None:
            h.update(b"\0content\0" + content_key.encode())
            files = []
        for f in files:
            h.update(b"\0" + str(f.relative_to(folder)).encode() + b"\0")
            with f.open("rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    except OSError as exc:
        log.warning("onnx_cache_key_failed", model=model.name, error=str(exc))
        return None
    return folder / OPTIMIZED_CACHE_DIR / f"{model.stem}-{h.hexdigest()[:32]}{_CACHE_SUFFIX}"


def new_work_dir(cached: Path) -> Path | None:
    """A fresh temporary folder in the cache folder to write the cache in, or None if it cannot
    be made (a read-only model folder: the model is loaded without a cache)."""
    try:
        cached.parent.mkdir(exist_ok=True)
        work = cached.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        work.mkdir()
    except OSError:
        return None
    return work


def remove_stale(cached: Path, keep: str) -> None:
    """Remove the other caches of this model (other device, onnxruntime or content; weights of a
    replaced graph) and temporary folders a crash left (not one another loader is writing now)."""
    prefix = cached.name[: -len(_CACHE_SUFFIX) - 32]  # "<model stem>-"
    same_model = re.compile(re.escape(prefix) + r"[0-9a-f]{32}" + re.escape(_CACHE_SUFFIX) + r"(\.[0-9a-f]+\.data)?")
    now = time.time()
    try:
        for other in cached.parent.iterdir():
            if other.name in (cached.name, keep):
                continue
            if same_model.fullmatch(other.name):
                unlink_quietly(other)
            elif other.name.startswith(_TMP_PREFIX) and now - other.stat().st_mtime > _STALE_TMP_S:
                remove_tree(other)
    except OSError:
        pass


def remove_tree(path: Path) -> None:
    try:
        for f in path.iterdir():
            unlink_quietly(f)
        path.rmdir()
    except OSError:
        pass


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
