"""The engine: the one active model, the worker threads that run it, warm-up and hot swap.

A request takes the active model once (one reference) and finishes on it, whatever swaps happen
meanwhile. A swap replaces that reference whole; the old model is closed when its last request
is done. All blocking work (decode, pre/post-processing, inference, model loading) runs in the
worker pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from PIL import Image

from handlers.base import Detection, Handler, HandlerMismatch, OptionsRejected, choose_handler
from handlers.decodecost import decode_cost
from handlers.imaging import ImageTooLarge, decode_image, sniff_format
from handlers.onnx_external import ModelFormatError, external_data_locations
from handlers.runtimes import ModelLoadError, Runtime, open_runtime
from supervisor.errors import Busy, ModelInvalid, NoModelLoaded
from supervisor.manifest import options_error
from supervisor.membudget import BudgetExceeded, BudgetTimeout, MemoryBudget
from supervisor.package import Manifest, PackageError, file_sha256, read_labels, read_manifest
from supervisor.pathrules import member_path
from supervisor.reasons import user_reason

__all__ = ["DetectResult", "Engine", "LoadedModel", "load_and_warm", "load_model"]

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

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "handler": self.handler,
            "model_file": self.model_file,
            "sha256": self.model_sha256,
            "score_threshold": self.score_threshold,
            "labels": len(self.labels),
        }


@dataclass
class LoadedModel:
    """A model ready to serve: runtime + handler + labels. Shared by all worker threads."""

    info: ModelInfo
    runtime: Runtime
    handler: Handler
    in_flight: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def label(self, class_id: int) -> str:
        labels = self.info.labels
        return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)

    def close_if_idle(self) -> None:
        with self.lock:
            if self.retired and self.in_flight == 0:
                self.runtime.close()


def load_model(
    folder: Path,
    default_threshold: float,
    runtime_threads: int = 1,
    manifest: Manifest | None = None,
    workers: int = 0,
    key: tuple[str, str] | None = None,
) -> LoadedModel:
    """Load a version folder: manifest, labels, runtime, handler; checks that they fit together.

    ``key``: the (name, version) a stored version has in the repository, for a package whose
    model.json does not say (otherwise the model would answer as its file name, version "1").
    Blocking: call it in a worker thread. Raises ModelInvalid with the reason."""
    try:
        manifest = manifest or read_manifest(folder, *(key or (None, None)))
        labels = read_labels(folder, manifest)
        checked = not manifest.model_file.lower().endswith(".onnx") or _check_external_data(folder, manifest.model_file)
        runtime = open_runtime(folder / manifest.model_file, runtime_threads, workers)
        if not checked:
            runtime.close()
            raise PackageError(f"{manifest.model_file} is not an ONNX model this service can check")
        handler = choose_handler(runtime.signature, manifest.handler, manifest.handler_options)
    except OptionsRejected as exc:
        raise ModelInvalid("model.json: " + options_error(exc.error, exc.model, exc.handler)) from exc
    except (PackageError, ModelLoadError, HandlerMismatch, OSError) as exc:
        raise ModelInvalid(user_reason(str(exc), None, folder)) from exc
    if not labels:
        raise ModelInvalid(
            "no labels: add labels.txt (one class name per line) or name the labels file in model.json"
        )
    expected = handler.num_classes
    if expected is not None and len(labels) < expected:
        raise ModelInvalid(f"labels file has {len(labels)} names but the model has {expected} classes")
    info = ModelInfo(
        name=manifest.name,
        version=manifest.version,
        handler=handler.name,
        path=folder,
        model_file=manifest.model_file,
        labels_file=manifest.labels_file,
        model_sha256=file_sha256(folder / manifest.model_file),
        score_threshold=manifest.score_threshold if manifest.score_threshold is not None else default_threshold,
        labels=tuple(labels),
    )
    return LoadedModel(info=info, runtime=runtime, handler=handler)


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
) -> LoadedModel:
    """``load_model``, then a blank image through the whole path (the engine, ``edgeloader verify``).

    The warm-up catches output shapes a handler cannot decode and pays the runtime's first-call
    cost before real requests arrive. Blocking; raises ModelInvalid with the reason."""
    model = load_model(folder, default_threshold, runtime_threads, manifest, workers, key)
    try:
        w, h = model.handler.input_size
        blank = Image.new("RGB", (max(w, 1), max(h, 1)), (114, 114, 114))
        prepared = model.handler.preprocess(blank)
        outputs = model.runtime.run(prepared.feeds)
        model.handler.postprocess(outputs, prepared)
    except Exception as exc:  # any failure here means the model is unusable
        model.runtime.close()
        raise ModelInvalid(user_reason(f"warm-up inference failed: {_describe(exc)}", None, folder)) from exc
    return model


def _describe(exc: BaseException) -> str:
    """The error's text, with its type when that says something (a TypeError from a handler; not a
    runtime's private InvalidArgument, whose text says it all)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__module__ == "builtins" and str(exc) else text


@dataclass
class DetectResult:
    model: ModelInfo
    width: int
    height: int
    detections: list[dict[str, Any]]
    timing_ms: dict[str, float]


def _box_dict(box: Sequence[float]) -> dict[str, float]:
    return {"xmin": box[0], "ymin": box[1], "xmax": box[2], "ymax": box[3]}


def _lower_priority() -> None:
    """Nice the calling thread (Linux nice values are per thread; threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):  # not Linux, or not allowed: run at normal priority
        pass


class Engine:
    """Owns the active model slot and the worker pool."""

    def __init__(
        self,
        workers: int,
        runtime_threads: int = 1,
        max_image_pixels: int = 50_000_000,
        default_threshold: float = 0.5,
        decode_memory_bytes: int = 256 << 20,
        decode_wait_seconds: float = 10.0,
    ) -> None:
        self.workers = workers
        # Image decodes in flight share this much memory; see membudget.py.
        self.decode_budget = MemoryBudget(decode_memory_bytes, decode_wait_seconds)
        self.runtime_threads = runtime_threads or max(1, (os.cpu_count() or 1) // workers)
        self.max_image_pixels = max_image_pixels
        self.default_threshold = default_threshold
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="infer")
        # Loading, unpacking and hashing get their own thread, at a lower CPU priority: on the
        # inference pool a model load took one of the workers for its whole duration, and at the
        # same priority it still competed with requests for the cores (p99 during swaps).
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=_lower_priority)
        self._active: LoadedModel | None = None
        # Called (on the loop) with the model whose requests keep failing right after activation.
        self.on_failure_streak: Callable[[LoadedModel, int], None] | None = None
        self._streak = 0
        self._succeeded_since_swap = False

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    # -- loading and swapping ------------------------------------------------------------------

    async def load(
        self, folder: Path, manifest: Manifest | None = None, key: tuple[str, str] | None = None
    ) -> LoadedModel:
        """Load and warm up a model in the pool; the active model keeps serving meanwhile.
        ``key``: a stored version's (name, version), see ``load_model``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.loader, self._load_and_warm, folder, manifest, key)

    def _load_and_warm(
        self, folder: Path, manifest: Manifest | None, key: tuple[str, str] | None
    ) -> LoadedModel:
        return load_and_warm(folder, self.default_threshold, self.runtime_threads, manifest, self.workers, key)

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` active; the old one is closed once its in-flight requests finish."""
        old, self._active = self._active, model
        self._streak = 0
        self._succeeded_since_swap = False
        if old is not None and old is not model:
            old.retired = True
            old.close_if_idle()
        log.info("model_swapped", model=model.info.name, version=model.info.version,
                 previous=old.info.version if old else None)
        return old

    # -- requests --------------------------------------------------------------------------------

    async def detect(
        self,
        data: bytes,
        threshold: float | None = None,
        max_results: int | None = None,
        labels: frozenset[str] | None = None,
    ) -> DetectResult:
        model = self._active
        if model is None:
            raise NoModelLoaded("no model is loaded yet")
        # Counted in flight from the moment it is taken (before any await): a swap meanwhile must not
        # close the model this request will run on.
        with model.lock:
            model.in_flight += 1
        try:
            # The header says what decoding will cost; wait for that much memory before a worker starts.
            fmt = sniff_format(data)
            cost = decode_cost(data, fmt, model.handler.input_size)
            async with self.decode_budget.reserve(cost):
                result = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._detect_sync, model, data, threshold, max_results, labels
                )
        except BudgetExceeded as exc:
            raise ImageTooLarge(f"this {fmt} image {exc} for decoding; send a JPEG or a smaller image") from None
        except BudgetTimeout as exc:
            raise Busy(f"busy decoding other large images ({exc}); retry later") from None
        except ModelInvalid:
            self._note_failure(model)
            raise
        finally:
            with model.lock:
                model.in_flight -= 1
            model.close_if_idle()
        if model is self._active:
            self._streak = 0
            self._succeeded_since_swap = True
        return result

    def _note_failure(self, model: LoadedModel) -> None:
        if model is not self._active or self._succeeded_since_swap:
            return
        self._streak += 1
        if self.on_failure_streak is not None:
            self.on_failure_streak(model, self._streak)

    def _detect_sync(
        self,
        model: LoadedModel,
        data: bytes,
        threshold: float | None,
        max_results: int | None,
        labels: frozenset[str] | None,
    ) -> DetectResult:
        t0 = time.perf_counter()
        image, (width, height) = decode_image(data, model.handler.input_size, self.max_image_pixels)
        t1 = time.perf_counter()
        try:
            prepared = model.handler.preprocess(image)
            t2 = time.perf_counter()
            outputs = model.runtime.run(prepared.feeds)
            t3 = time.perf_counter()
            found = model.handler.postprocess(outputs, prepared)
        except Exception as exc:
            # The image decoded fine, so this is the model's fault, not the client's.
            raise ModelInvalid(user_reason(f"inference failed: {_describe(exc)}", None, model.info.path)) from exc
        t4 = time.perf_counter()
        detections = self._format(model, found, width, height, threshold, max_results, labels)
        ms = 1000.0
        timing = {
            "decode": round((t1 - t0) * ms, 3),
            "preprocess": round((t2 - t1) * ms, 3),
            "inference": round((t3 - t2) * ms, 3),
            "postprocess": round((t4 - t3) * ms, 3),
        }
        return DetectResult(model.info, width, height, detections, timing)

    def _format(
        self,
        model: LoadedModel,
        found: list[Detection],
        width: int,
        height: int,
        threshold: float | None,
        max_results: int | None,
        labels: frozenset[str] | None,
    ) -> list[dict[str, Any]]:
        cut = model.info.score_threshold if threshold is None else threshold
        out: list[dict[str, Any]] = []
        scale = np.array([width, height, width, height], dtype=np.float64)
        for det in found:
            if det.score < cut:
                continue
            label = model.label(det.class_id)
            if labels is not None and label not in labels:
                continue
            norm = np.clip(np.asarray(det.box, dtype=np.float64), 0.0, 1.0)
            pixels = norm * scale
            out.append({
                "label": label,
                "class_id": int(det.class_id),
                "score": round(float(det.score), 4),
                "box": _box_dict([round(float(v), 1) for v in pixels]),
                "box_normalized": _box_dict([round(float(v), 5) for v in norm]),
            })
            if max_results is not None and len(out) >= max_results:
                break
        return out

    def shutdown(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
