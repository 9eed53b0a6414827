"""The model package format: what is inside a model folder and what its manifest says.

Pure functions over a folder on disk (no runtime, no event loop). A package is a folder (or a zip,
unpacked by ``archive.py``) holding exactly one model file (``.onnx``, maybe with external-data
sidecars, or ``.tflite``), a labels file, and an optional ``model.json`` manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.formats import LABEL_FILE_NAMES, MANIFEST_NAME, MODEL_SUFFIXES
from supervisor.package.manifest import parse_manifest
from supervisor.package.paths import PackageError, member_path, safe_name, walk_files

__all__ = [
    "LABEL_FILE_NAMES",
    "MANIFEST_NAME",
    "Manifest",
    "PackageError",
    "file_sha256",
    "read_labels",
    "read_manifest",
]

# Read before anything else: a manifest or a labels file is text of a few kilobytes; a 50 MB one is
# an attack on the loader's memory, not a package.
MAX_MANIFEST_BYTES = 1 << 20
MAX_LABELS_BYTES = 4 << 20


@dataclass(frozen=True)
class Manifest:
    """What a package declares (or what was inferred when it has no model.json)."""

    name: str
    version: str
    model_file: str
    labels_file: str | None
    handler: str | None = None
    score_threshold: float | None = None
    activate: bool = True
    description: str = ""
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    handler_options: Mapping[str, Any] = field(default_factory=dict)
    # SHA-256 of every file of the unpacked package (relative path -> hex), computed once at staging
    # and kept in the install record: later steps and later loads reuse it instead of re-reading.
    hashes: Mapping[str, str] = field(default_factory=dict)
    # Who signed the package (signature.py: key name, fingerprint, verified), None when unsigned.
    signer: Mapping[str, Any] | None = None




def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _visible(folder: Path, pattern: str) -> list[Path]:
    """Regular files under ``folder`` whose name matches ``pattern``, leaving out hidden paths: they
    are never package content (``edgeloader pack`` skips them) but derived data, such as a runtime's
    optimised-model cache, which may hold a half-written ``.onnx`` after a crash."""
    return sorted(
        folder / rel for rel, st in walk_files(folder, skip_hidden=True)
        if stat.S_ISREG(st.st_mode) and fnmatch.fnmatch(rel.name, pattern)
    )


def read_small_text(path: Path, limit: int, what: str) -> str:
    """A package's text file (manifest, labels), refused unread when over ``limit`` bytes."""
    size = path.lstat().st_size
    if size > limit:
        raise PackageError(f"{what} is {size} bytes; the limit is {limit}")
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageError(f"{what} is not UTF-8 text") from exc


def _find_model_file(folder: Path) -> str:
    models = [p for p in _visible(folder, "*") if p.suffix.lower() in MODEL_SUFFIXES]
    if not models:
        raise PackageError("no model file in the package: expected one *.onnx or *.tflite")
    if len(models) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in models)
        raise PackageError(f"several model files in the package ({names}); name one in model.json 'model'")
    return str(models[0].relative_to(folder))


def _find_labels_file(folder: Path) -> str | None:
    for name in LABEL_FILE_NAMES:
        hits = _visible(folder, name)
        if hits:
            return str(hits[0].relative_to(folder))
    names = _visible(folder, "*.names")
    return str(names[0].relative_to(folder)) if names else None


def read_manifest(folder: Path, fallback_name: str | None = None, fallback_version: str | None = None) -> Manifest:
    """The package's manifest, completed by inference where model.json is absent or silent.

    ``fallback_name``/``fallback_version`` come from the package's file name or its hash."""
    raw: Any = {}
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.exists() or manifest_path.is_symlink():
        member_path(folder, MANIFEST_NAME, MANIFEST_NAME)  # a regular file, not a link to one
        try:
            raw = json.loads(read_small_text(manifest_path, MAX_MANIFEST_BYTES, MANIFEST_NAME))
        except json.JSONDecodeError as exc:
            raise PackageError(f"model.json is not valid JSON: {exc}") from exc
        except RecursionError:  # "[[[[…" a hundred thousand deep fits in 1 MB (found by the fuzzer)
            raise PackageError("model.json nests too deep to be a manifest") from None
        if not isinstance(raw, dict):
            raise PackageError("model.json must hold a JSON object")
    try:
        declared = parse_manifest(raw)  # types, unknown keys, the named handler's options
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    # Every name checked on disk too (pathrules): inside, regular, reached without a symlink.
    if declared.model:
        model_file = member_path(folder, declared.model, "model.json 'model'")
    else:
        model_file = _find_model_file(folder)
    if Path(model_file).suffix.lower() not in MODEL_SUFFIXES:
        raise PackageError("model.json 'model' is neither a .onnx nor a .tflite file")
    if declared.labels:
        labels_file: str | None = member_path(folder, declared.labels, "model.json 'labels'")
    else:
        labels_file = _find_labels_file(folder)
    # Checked here, before any hashing: an entry naming a file outside must not get a checksum
    # (nor a "missing") answer that tells the sender something about that file.
    files = {member_path(folder, k, "model.json 'files'"): v for k, v in declared.files.items()}
    name = safe_name(declared.name or fallback_name or Path(model_file).stem)
    version = safe_name(declared.version or fallback_version or "1")
    return Manifest(
        name=name,
        version=version,
        model_file=model_file,
        labels_file=labels_file,
        handler=declared.handler,
        score_threshold=declared.score_threshold,
        activate=declared.activate,
        description=declared.description,
        files=files,
        handler_options=dict(declared.handler_options),
    )


def _labels_from_text(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    # labelmap.txt style "0 person" / "0: person" is common; plain one-per-line is the norm.
    if lines and all(re.match(r"^\d+[:\s]\s*\S", line) for line in lines if line):
        lines = [re.sub(r"^\d+[:\s]\s*", "", line) for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def tflite_embedded_labels(model_path: Path) -> list[str] | None:
    """Labels packed in TFLite metadata: the .tflite doubles as a zip holding a labels file."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".txt") and info.file_size < 1_000_000:
                    return _labels_from_text(zf.read(info).decode("utf-8", "replace"))
    except zipfile.BadZipFile:
        return None
    return None


def read_labels(folder: Path, manifest: Manifest) -> list[str]:
    """The class names, from the labels file or the TFLite metadata; [] when there are none."""
    if manifest.labels_file:
        labels = member_path(folder, manifest.labels_file, "the labels file")
        return _labels_from_text(read_small_text(folder / labels, MAX_LABELS_BYTES, f"labels file {labels}"))
    if manifest.model_file.lower().endswith(".tflite"):
        return tflite_embedded_labels(folder / member_path(folder, manifest.model_file, "the model file")) or []
    return []


def package_file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular, visible file under ``folder`` (relative POSIX path -> hex). Blocking:
    the one pass over an unpacked package's bytes."""
    return {str(rel): file_sha256(folder / rel) for rel, st in walk_files(folder, skip_hidden=True)
            if stat.S_ISREG(st.st_mode)}


def verify_files(folder: Path, manifest: Manifest, hashes: Mapping[str, str] | None = None) -> None:
    """Check every file the manifest lists against its SHA-256 (``hashes``: already computed ones)."""
    for rel, expected in manifest.files.items():
        path = folder / member_path(folder, rel, "model.json 'files'")
        actual = (hashes or {}).get(rel) or file_sha256(path)
        if actual != expected:
            raise PackageError(f"checksum mismatch for {rel}: manifest {expected[:12]}…, file {actual[:12]}…")
