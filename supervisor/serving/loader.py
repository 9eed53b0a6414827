"""Loading a model: a version folder -> manifest, labels, runtime, handler, checked to fit, warmed up.

Blocking functions (the engine runs them in its loader thread, ``edgeloader verify`` directly).
Every path the package names is checked first (package/paths.py), ONNX external-data locations
included, before a runtime opens anything.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from handlers.base import Handler, HandlerMismatch, OptionsRejected, choose_handler
from handlers.classifier import ImageClassifier
from handlers.onnx_external import ModelFormatError, external_data_locations
from handlers.runtimes import ModelLoadError, Runtime, Spawn, open_runtime
from supervisor.errors import ModelInvalid
from supervisor.package.manifest import options_error
from supervisor.package.paths import member_path
from supervisor.package.reader import Manifest, PackageError, file_sha256, read_labels, read_manifest
from supervisor.package.reasons import user_reason

__all__ = ["LoadedModel", "ModelInfo", "describe_error", "load_and_warm", "load_model"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    handler: str
    path: Path  # the version folder
    model_file: str
    labels_file: str | None
    model_sha256: str
    score_threshold: float
    labels: tuple[str, ...]
    # Where the class names come from: "file" (the package's labels file), "model" (the model file's
    # metadata: TFLite packed labels, Ultralytics names) or "none" (class_<id>).
    labels_source: str = "file"
    task: str = "detect"  # what the model answers: "detect" (POST /detect) or "classify" (POST /classify)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "handler": self.handler,
            "task": self.task,
            "model_file": self.model_file,
            "sha256": self.model_sha256,
            "score_threshold": self.score_threshold,
            "labels": len(self.labels),
            "labels_source": self.labels_source,
        }


@dataclass
class LoadedModel:
    """A model ready to serve: runtime + handler + labels. Shared by all worker threads."""

    info: ModelInfo
    runtime: Runtime
    handler: Handler
    in_flight: int = 0
    retired: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def label(self, class_id: int) -> str:
        labels = self.info.labels
        return labels[class_id] if 0 <= class_id < len(labels) else f"class_{class_id}"

    def due_for_close(self) -> bool:
        """True once, when the model is retired and its last request has ended: the caller closes
        the runtime (off the event loop), and nobody else will."""
        with self.lock:
            if self.retired and self.in_flight == 0 and not self.closed:
                self.closed = True
                return True
            return False


def load_model(
    folder: Path,
    default_threshold: float,
    runtime_threads: int = 1,
    manifest: Manifest | None = None,
    workers: int = 0,
    key: tuple[str, str] | None = None,
    hashes: Mapping[str, str] | None = None,
    wide_threads: int = 0,
    spawn: Spawn[Any] | None = None,
) -> LoadedModel:
    """Load a version folder: manifest, labels, runtime, handler; checks that they fit together.

    ``key``: the (name, version) a stored version has in the repository, for a package whose
    model.json does not say (otherwise the model would answer as its file name, version "1").
    Class names: the package's labels file (named in model.json or found by name), else those the
    model file carries (TFLite metadata, Ultralytics ``names``), else ``class_<id>`` with a warning.
    Blocking: call it in a worker thread. Raises ModelInvalid with the reason."""
    try:
        manifest = manifest or read_manifest(folder, *(key or (None, None)))
        labels = read_labels(folder, manifest)
        checked = not manifest.model_file.lower().endswith(".onnx") or _check_external_data(folder, manifest.model_file)
        known = dict(manifest.hashes or hashes or {})
        runtime = open_runtime(folder / manifest.model_file, runtime_threads, workers, _content_key(known),
                               wide_threads, **({"spawn": spawn} if spawn is not None else {}))
        if not checked:
            runtime.close()
            raise PackageError(f"{manifest.model_file} is not an ONNX model this service can check")
        handler = choose_handler(runtime.signature, manifest.handler, manifest.handler_options)
    except OptionsRejected as exc:
        raise ModelInvalid("model.json: " + options_error(exc.error, exc.model, exc.handler)) from exc
    except (PackageError, ModelLoadError, HandlerMismatch, OSError) as exc:
        raise ModelInvalid(user_reason(str(exc), None, folder)) from exc
    for problem in handler.metadata.problems:
        log.warning("model_metadata_unreadable", model=manifest.name, version=manifest.version, problem=problem)
    if labels:
        try:
            labels = handler.fit_labels(labels)
        except ValueError as exc:
            runtime.close()
            raise ModelInvalid(str(exc)) from exc
    expected = handler.num_classes
    source = "file" if manifest.labels_file else "model"
    if labels and expected is not None and len(labels) < expected:
        what = "labels file" if manifest.labels_file else "model's embedded labels"
        raise ModelInvalid(f"{what} has {len(labels)} names but the model has {expected} classes")
    if not labels and handler.labels:
        labels = list(handler.labels)
        if expected is not None and len(labels) < expected:
            log.warning("model_names_short", model=manifest.name, version=manifest.version, names=len(labels),
                        classes=expected, hint="the classes past them are named class_<id>")
    if not labels:
        source = "none"
        log.warning("model_without_labels", model=manifest.name, version=manifest.version, classes=expected,
                    hint="detections are labelled class_<id>; add labels.txt (one class name per line) "
                         "or name the labels file in model.json")
    info = ModelInfo(
        name=manifest.name,
        version=manifest.version,
        handler=handler.name,
        path=folder,
        model_file=manifest.model_file,
        labels_file=manifest.labels_file,
        model_sha256=known.get(manifest.model_file) or file_sha256(folder / manifest.model_file),
        score_threshold=manifest.score_threshold if manifest.score_threshold is not None else default_threshold,
        labels=tuple(labels),
        labels_source=source,
        task=handler.task,
    )
    return LoadedModel(info=info, runtime=runtime, handler=handler)


def _content_key(hashes: Mapping[str, str]) -> str | None:
    """A digest of the package's files from their known SHA-256s (None when they are not known)."""
    if not hashes:
        return None
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def _check_external_data(folder: Path, model_file: str) -> bool:
    """Every external-data file the ONNX model names lies inside the package (the path rule), checked
    before onnxruntime opens anything: older runtimes follow '../' and absolute locations. False when
    the file is not protobuf we can read: the runtime then says what is wrong with it (and if it
    loads it all the same, the model is refused: it could hide a location from this check)."""
    try:
        locations = external_data_locations(folder / model_file)
    except ModelFormatError:
        return False
    base = (folder / model_file).parent
    for location in set(locations):
        member_path(base, location, "an external-data location in the model")
    return True


def load_and_warm(
    folder: Path,
    default_threshold: float,
    runtime_threads: int = 1,
    manifest: Manifest | None = None,
    workers: int = 0,
    key: tuple[str, str] | None = None,
    hashes: Mapping[str, str] | None = None,
    wide_threads: int = 0,
    spawn: Spawn[Any] | None = None,
) -> LoadedModel:
    """``load_model``, then a blank image through the whole path (the engine, ``edgeloader verify``).

    The warm-up catches output shapes a handler cannot decode and pays the runtime's first-call
    cost before real requests arrive. Blocking; raises ModelInvalid with the reason."""
    model = load_model(folder, default_threshold, runtime_threads, manifest, workers, key, hashes, wide_threads, spawn)
    try:
        w, h = model.handler.input_size
        blank = Image.new("RGB", (max(w, 1), max(h, 1)), (114, 114, 114))
        prepared = model.handler.preprocess(blank)
        # Both lanes run: the wide one (a lone request's) pays its runtime's first-call set-up here too.
        for alone in (False, True):
            outputs = model.runtime.run(prepared.feeds, alone=alone)
            if isinstance(model.handler, ImageClassifier):
                model.handler.classify(outputs, prepared)
            else:
                model.handler.postprocess(outputs, prepared)
    except Exception as exc:  # any failure here means the model is unusable
        model.runtime.close()
        raise ModelInvalid(user_reason(f"warm-up inference failed: {describe_error(exc)}", None, folder)) from exc
    return model


def describe_error(exc: BaseException) -> str:
    """The error's text, with its type when that says something (a TypeError from a handler; not a
    runtime's private InvalidArgument, whose text says it all)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__module__ == "builtins" and str(exc) else text


