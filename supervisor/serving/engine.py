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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from handlers.base import Detection, Prepared
from handlers.classifier import ImageClassifier
from handlers.decodecost import decode_cost
from handlers.imaging import ImageTooLarge, decode_image, sniff_format
from supervisor.errors import Busy, Conflict, ModelInvalid, NoModelLoaded
from supervisor.package.reader import Manifest
from supervisor.package.reasons import user_reason
from supervisor.serving.loader import LoadedModel, ModelInfo, describe_error, load_and_warm
from supervisor.serving.membudget import BudgetExceeded, BudgetTimeout, MemoryBudget

__all__ = ["ClassifyResult", "DetectResult", "Engine"]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


@dataclass
class DetectResult:
    model: ModelInfo
    width: int
    height: int
    detections: list[dict[str, Any]]
    timing_ms: dict[str, float]


@dataclass
class ClassifyResult:
    model: ModelInfo
    width: int
    height: int
    classes: list[dict[str, Any]]  # best first: label, class_id, score (a probability)
    timing_ms: dict[str, float]


_R = TypeVar("_R")


def _box_dict(box: Sequence[float]) -> dict[str, float]:
    return {"xmin": box[0], "ymin": box[1], "xmax": box[2], "ymax": box[3]}


def _ms(seconds: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v * 1000.0, 3) for k, v in seconds.items()}


def _model_failed(model: LoadedModel, exc: BaseException) -> ModelInvalid:
    return ModelInvalid(user_reason(f"inference failed: {describe_error(exc)}", None, model.info.path))


def _wrong_task(model: LoadedModel, task: str) -> str:
    name = f"model {model.info.name!r} (version {model.info.version!r}, handler {model.info.handler})"
    if task == "detect":
        return f"{name} is an image classifier: it makes no detections; send the image to POST /classify"
    return f"{name} is an object detector: it does not classify whole images; send the image to POST /detect"


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
        wide_lane: bool = True,
    ) -> None:
        self.workers = workers
        # Image decodes in flight share this much memory; see membudget.py.
        self.decode_budget = MemoryBudget(decode_memory_bytes, decode_wait_seconds)
        self.runtime_threads = runtime_threads or max(1, (os.cpu_count() or 1) // workers)
        # A lone request (one camera sending one frame at a time) runs on every core; several at once
        # run on ``runtime_threads`` each (see handlers/runtimes.open_runtime). 0: no wide lane.
        cores = os.cpu_count() or 1
        self.wide_threads = cores if wide_lane and cores > self.runtime_threads else 0
        self._requests = 0  # requests in flight on any model (read from the worker threads)
        self.max_image_pixels = max_image_pixels
        self.default_threshold = default_threshold
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="infer")
        # Loading, unpacking and hashing get their own thread, at a lower CPU priority: on the
        # inference pool a model load took one of the workers for its whole duration, and at the
        # same priority it still competed with requests for the cores (p99 during swaps).
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="load", initializer=_lower_priority)
        # Multi-threaded runtimes (the wide lane) are made here instead, at normal priority, because
        # their intra-op threads inherit the priority of the thread that makes them (runtimes.py,
        # open_runtime). Its thread is started now, from this (normal) thread, not lazily from the loader.
        self.lanes = ThreadPoolExecutor(1, thread_name_prefix="lanes")
        self.lanes.submit(lambda: None).result()
        self._active: LoadedModel | None = None
        # Called (on the loop) with the model whose requests keep failing right after activation.
        self.on_failure_streak: Callable[[LoadedModel, int], None] | None = None
        # Called (on the loop) after each load with its duration in seconds and whether it worked (metrics).
        self.on_load: Callable[[float, bool], None] | None = None
        self._streak = 0
        self._succeeded_since_swap = False

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    # -- loading and swapping ------------------------------------------------------------------

    async def load(
        self, folder: Path, manifest: Manifest | None = None, key: tuple[str, str] | None = None,
        hashes: Mapping[str, str] | None = None,
    ) -> LoadedModel:
        """Load and warm up a model in the pool; the active model keeps serving meanwhile.
        ``key``: a stored version's (name, version); ``hashes``: its recorded file hashes (see
        ``load_model``)."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            model = await loop.run_in_executor(self.loader, self._load_and_warm, folder, manifest, key, hashes)
        except Exception:
            if self.on_load is not None:
                self.on_load(time.perf_counter() - start, False)
            raise
        if self.on_load is not None:
            self.on_load(time.perf_counter() - start, True)
        return model

    def _load_and_warm(
        self, folder: Path, manifest: Manifest | None, key: tuple[str, str] | None,
        hashes: Mapping[str, str] | None,
    ) -> LoadedModel:
        return load_and_warm(folder, self.default_threshold, self.runtime_threads, manifest, self.workers, key,
                             hashes, self.wide_threads, self._at_normal_priority)

    def _at_normal_priority(self, make: Callable[[], _T]) -> _T:
        return self.lanes.submit(make).result()

    async def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` active; the old one is closed once its in-flight requests finish (now, if
        none runs). The switch itself is one assignment, before any await."""
        old, self._active = self._active, model
        self._streak = 0
        self._succeeded_since_swap = False
        if old is not None and old is not model:
            old.retired = True
            await self._close_if_due(old)
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
        def work(model: LoadedModel) -> DetectResult:
            return self._detect_sync(model, data, threshold, max_results, labels)

        return await self._serve(data, "detect", work)

    async def classify(self, data: bytes, top_k: int = 5) -> ClassifyResult:
        """The ``top_k`` likeliest classes of the image (an image classifier's task)."""

        def work(model: LoadedModel) -> ClassifyResult:
            return self._classify_sync(model, data, top_k)

        return await self._serve(data, "classify", work)

    async def _serve(self, data: bytes, task: str, work: Callable[[LoadedModel], _R]) -> _R:
        """Run ``work`` on the active model in a worker, within the decode memory budget."""
        model = self._active
        if model is None:
            raise NoModelLoaded("no model is loaded yet")
        if model.handler.task != task:
            raise Conflict(_wrong_task(model, task))
        # Counted in flight from the moment it is taken (before any await): a swap meanwhile must not
        # close the model this request will run on.
        with model.lock:
            model.in_flight += 1
        self._requests += 1
        try:
            # The header says what decoding will cost; wait for that much memory before a worker starts.
            fmt = sniff_format(data)
            cost = decode_cost(data, fmt, model.handler.input_size)
            async with self.decode_budget.reserve(cost):
                result = await asyncio.get_running_loop().run_in_executor(self.executor, work, model)
        except BudgetExceeded as exc:
            raise ImageTooLarge(f"this {fmt} image {exc} for decoding; send a JPEG or a smaller image") from None
        except BudgetTimeout as exc:
            raise Busy(f"busy decoding other large images ({exc}); retry later") from None
        except ModelInvalid:
            self._note_failure(model)
            raise
        finally:
            self._requests -= 1
            with model.lock:
                model.in_flight -= 1
            await self._close_if_due(model)
        if model is self._active:
            self._streak = 0
            self._succeeded_since_swap = True
        return result

    @staticmethod
    async def _close_if_due(model: LoadedModel) -> None:
        # Freeing a runtime (an ORT session, TFLite interpreters) takes milliseconds of native work:
        # a thread, not the event loop. Not the loader thread either: a load there takes seconds.
        if model.due_for_close():
            await asyncio.to_thread(model.runtime.close)

    def _note_failure(self, model: LoadedModel) -> None:
        if model is not self._active or self._succeeded_since_swap:
            return
        self._streak += 1
        if self.on_failure_streak is not None:
            self.on_failure_streak(model, self._streak)

    def _run_sync(self, model: LoadedModel, data: bytes) -> tuple[Prepared, Mapping[str, np.ndarray], int, int,
                                                                   dict[str, float]]:
        """Decode, preprocess, infer: (prepared, outputs, original width, height, timings so far)."""
        t0 = time.perf_counter()
        image, (width, height) = decode_image(data, model.handler.input_size, self.max_image_pixels,
                                              model.handler.letterboxes)
        t1 = time.perf_counter()
        try:
            prepared = model.handler.preprocess(image)
            t2 = time.perf_counter()
            # Decided now, not at arrival: a request that came while this one decoded shares the cores.
            outputs = model.runtime.run(prepared.feeds, alone=self._requests <= 1)
        except Exception as exc:
            # The image decoded fine, so this is the model's fault, not the client's.
            raise _model_failed(model, exc) from exc
        t3 = time.perf_counter()
        timing = {"decode": t1 - t0, "preprocess": t2 - t1, "inference": t3 - t2}
        return prepared, outputs, width, height, timing

    def _detect_sync(
        self,
        model: LoadedModel,
        data: bytes,
        threshold: float | None,
        max_results: int | None,
        labels: frozenset[str] | None,
    ) -> DetectResult:
        prepared, outputs, width, height, timing = self._run_sync(model, data)
        t3 = time.perf_counter()
        try:
            found = model.handler.postprocess(outputs, prepared)
        except Exception as exc:
            raise _model_failed(model, exc) from exc
        timing["postprocess"] = time.perf_counter() - t3
        detections = self._format(model, found, width, height, threshold, max_results, labels)
        return DetectResult(model.info, width, height, detections, _ms(timing))

    def _classify_sync(self, model: LoadedModel, data: bytes, top_k: int) -> ClassifyResult:
        prepared, outputs, width, height, timing = self._run_sync(model, data)
        t3 = time.perf_counter()
        classifier = model.handler
        assert isinstance(classifier, ImageClassifier)  # _serve checked the task
        try:
            probabilities = classifier.classify(outputs, prepared)
        except Exception as exc:
            raise _model_failed(model, exc) from exc
        k = min(top_k, len(probabilities))
        top = np.argpartition(-probabilities, k - 1)[:k]
        top = top[np.argsort(-probabilities[top], kind="stable")]
        classes = [{"label": model.label(int(i)), "class_id": int(i), "score": round(float(probabilities[i]), 5)}
                   for i in top]
        timing["postprocess"] = time.perf_counter() - t3
        return ClassifyResult(model.info, width, height, classes, _ms(timing))

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
        scale = (width, height, width, height)
        for det in found:
            if det.score < cut:
                continue
            label = model.label(det.class_id)
            if labels is not None and label not in labels:
                continue
            # Four floats: plain Python beats numpy's per-call overhead (the same float64 results).
            norm = [min(max(float(v), 0.0), 1.0) for v in det.box]
            pixels = [v * s for v, s in zip(norm, scale, strict=True)]
            found_one: dict[str, Any] = {
                "label": label,
                "class_id": int(det.class_id),
                "score": round(float(det.score), 4),
                "box": _box_dict([round(v, 1) for v in pixels]),
                "box_normalized": _box_dict([round(v, 5) for v in norm]),
            }
            if det.keypoints:
                # Pixels of the original image, not clipped: a keypoint may lie outside it.
                found_one["keypoints"] = [{"x": round(x * width, 1), "y": round(y * height, 1)}
                                          for x, y in det.keypoints]
            out.append(found_one)
            if max_results is not None and len(out) >= max_results:
                break
        return out

    def shutdown(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.lanes.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
