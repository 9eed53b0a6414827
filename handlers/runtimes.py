"""Model runtimes behind one small interface: onnxruntime for ONNX, LiteRT for TFLite.

An ``onnxruntime.InferenceSession`` is thread-safe and is shared by the worker threads. A TFLite
interpreter is not: each worker thread gets its own, created on first use from the same model
bytes (held once in memory).

ONNX models are loaded through a per-device cache of the optimised model (handlers/ort_cache.py,
a folder beside the model file): see ``OnnxRuntime``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog

from handlers import ort_cache
from handlers.base import Signature, TensorSpec

__all__ = [
    "ModelLoadError",
    "Runtime",
    "RuntimeMissing",
    "open_runtime",
    "tflite_interpreter_class",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
# Runs a callable on a thread of normal CPU priority and returns its result (see ``open_runtime``).
Spawn = Callable[[Callable[[], _T]], _T]


def _here(make: Callable[[], _T]) -> _T:
    return make()


class ModelLoadError(Exception):
    """The model file cannot be loaded by its runtime."""


class RuntimeMissing(ModelLoadError):
    """The runtime the model needs is not installed here (``edgeloader pack`` on a build machine)."""


class Runtime(Protocol):
    signature: Signature

    @property
    def has_wide_lane(self) -> bool:
        """Whether a lone call gets a session or interpreter of its own that uses every core."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray], alone: bool = False) -> dict[str, np.ndarray]:
        """Run the model. ``alone``: no other request is in flight, so this call may use every core
        (the wide lane, see ``open_runtime``)."""
        ...

    def close(self) -> None: ...


# Initializers from this size on go to the cache's external-data file; smaller ones (shape
# constants, which onnxruntime's shape inference must read from the graph itself) stay inline.
_EXTERNAL_MIN_BYTES = 1024


def _dim(d: Any) -> int | None:
    return int(d) if isinstance(d, int | np.integer) and int(d) > 0 else None


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class OnnxRuntime:
    """One shared onnxruntime session, loaded through a per-device cache of the optimised model.

    Why: building a session from the original model peaks at about twice the model's loaded size
    (tiny-YOLOv3: +128 MB for 74 MB loaded): the parsed protobuf, the initializers copied out of
    it, and the ORT_ENABLE_ALL layout transform (NCHWc) writing reordered copies of the
    convolution weights, all alive at once. Session options do not change that peak
    (``use_device_allocator_for_initializers``, ``disable_prepacking``, no CPU arena, an
    env arena growing by kSameAsRequested, loading from bytes: same or higher); a lower
    optimisation level does, but costs 15-25 % throughput.

    So the model is loaded from ``.ort-cache/<stem>-<key>.ortopt`` (ort_cache.py): the graph as
    ORT_ENABLE_ALL left it, its weights in an external-data file beside it that onnxruntime
    memory-maps, loaded with optimisations off (they are all applied already): peak about 1.0x
    the loaded size, the same kernels, identical outputs, same speed. Making the cache (first
    load of a model on a device: install, or the first load after an onnxruntime upgrade) takes
    two sessions that are thrown away, so that neither holds the inline weights while it
    optimises: the original model with optimisations off, saved with external data (peak ~0.9x),
    then that (memory-mapped) with ORT_ENABLE_ALL, saved as the cache (peak ~1.2-1.3x); then the
    cache is loaded like any later time. About 0.15 s more for a 35 MB model, once.

    The optimised graph is specific to the CPU (NCHWc block size) and to the onnxruntime build,
    so the key covers both, the cache format and the bytes of every non-hidden file beside the
    model (the model and any external-data sidecar): another device, an onnxruntime upgrade or a
    changed file never reads a stale cache; it writes a new one and removes the others. Written
    in a temporary folder, fsynced, then renamed into place weights first, graph last: a graph
    in the cache always has its complete weights, under a name of its own (a second writer of
    the same key cannot pair one's graph with the other's weights). A cache that fails to load
    is deleted and made again. Anything going wrong with the cache (read-only folder, full disk)
    only costs the saving: the original is then loaded as before.
    """

    def __init__(
        self, path: Path, threads: int = 0, cache: bool = True, content_key: str | None = None, wide_threads: int = 0,
        spawn: Spawn[Any] = _here,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeMissing(f"onnxruntime is not installed here, so {path.name} cannot be loaded") from exc

        self._ort = ort
        self._threads = threads
        cached = ort_cache.cache_path(path, ort.__version__, content_key) if cache else None
        session = self._load_cached(cached) if cached is not None and cached.is_file() else None
        if session is None:
            session = self._load_original(path, cached)
        self._session = session
        # The wide lane: a second session over the same (memory-mapped) cached weights whose calls
        # may use every core; it costs about 0.5 MB beside tiny-YOLOv3's 32 MB (bench/lanes.py).
        self._wide: Any = None
        if wide_threads > max(threads, 1):
            if cached is not None and cached.is_file():
                self._wide = spawn(lambda: self._load_cached(cached, wide_threads))
            if self._wide is None:
                self._wide = spawn(lambda: self._session_of(path, self._options(threads=wide_threads)))
        self.signature = Signature(
            format="onnx",
            inputs=tuple(
                TensorSpec(i.name, tuple(_dim(d) for d in i.shape), _ORT_TYPES.get(i.type, i.type))
                for i in self._session.get_inputs()
            ),
            outputs=tuple(
                TensorSpec(o.name, tuple(_dim(d) for d in o.shape), _ORT_TYPES.get(o.type, o.type))
                for o in self._session.get_outputs()
            ),
            # What the exporter wrote about the model (Ultralytics: names, imgsz, task, stride).
            extra={"metadata": dict(self._session.get_modelmeta().custom_metadata_map)},
        )
        self._output_names = [o.name for o in self.signature.outputs]

    def _options(self, optimize: bool = True, save_to: Path | None = None, threads: int | None = None) -> Any:
        opts = self._ort.SessionOptions()
        # intra-op threads per call; the engine's pool gives concurrency across calls.
        opts.intra_op_num_threads = self._threads if threads is None else threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not optimize:
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if save_to is not None:
            opts.optimized_model_filepath = str(save_to)
            opts.add_session_config_entry("session.save_model_format", "ONNX")  # not from the suffix
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          ort_cache.data_name(save_to.name, save_to.parent.name))
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                          str(_EXTERNAL_MIN_BYTES))
        return opts

    def _session_of(self, model: Path, opts: Any) -> Any:
        return self._ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])

    def _load_cached(self, cached: Path, threads: int | None = None) -> Any:
        opts = self._options(optimize=False, threads=threads)
        opts.add_session_config_entry("session.load_model_format", "ONNX")  # not from the suffix
        try:
            return self._session_of(cached, opts)
        except Exception as exc:  # a damaged cache: drop it, make it again
            log.warning("onnx_cache_unreadable", path=str(cached), error=_first_line(exc))
            ort_cache.unlink_quietly(cached)
            return None

    def _load_original(self, path: Path, cached: Path | None) -> Any:
        work = ort_cache.new_work_dir(cached) if cached is not None else None
        cache_error: str | None = None
        if work is not None and cached is not None:
            try:
                self._write_cache(path, work, cached)
            except Exception as exc:  # onnxruntime's own exception types, OSError
                cache_error = _first_line(exc)
            finally:
                ort_cache.remove_tree(work)
            if cache_error is None and (session := self._load_cached(cached)) is not None:
                return session
        try:
            # Loading by path lets onnxruntime find external-data sidecars beside the model.
            session = self._session_of(path, self._options())
        except Exception as exc:  # onnxruntime raises several private exception types
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {_first_line(exc)}") from exc
        if cache_error is not None:
            log.warning("onnx_cache_not_written", model=path.name, error=cache_error)
        return session

    def _write_cache(self, path: Path, work: Path, cached: Path) -> None:
        """Write the optimised model into ``work``, then move it into place as ``cached``."""
        # 1. The model as it is, weights saved to an external-data file (so step 2 maps them
        #    instead of holding the parsed protobuf and a copy of every initializer).
        plain = work / "plain.onnx"
        self._session_of(path, self._options(optimize=False, save_to=plain))  # dropped at once
        # 2. Optimised (ORT_ENABLE_ALL, the default) and saved: the cache.
        graph = work / cached.name
        self._session_of(plain, self._options(save_to=graph))
        data = work / ort_cache.data_name(graph.name, work.name)  # absent when every initializer is small
        written = [f for f in (data, graph) if f.exists()]
        for f in written:
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        # Weights first: a graph in the cache always has its weights.
        for f in written:
            os.replace(f, cached if f == graph else cached.parent / f.name)
        fd = os.open(cached.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        ort_cache.remove_stale(cached, keep=data.name)
        log.info("onnx_cache_written", path=str(cached))

    def run(self, feeds: Mapping[str, np.ndarray], alone: bool = False) -> dict[str, np.ndarray]:
        # Sessions are thread-safe: the wide one needs no lock (two lone calls at once only share cores).
        session = self._wide if alone and self._wide is not None else self._session
        results = session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results, strict=True))

    @property
    def has_wide_lane(self) -> bool:
        return self._wide is not None

    def close(self) -> None:
        del self._session
        self._wide = None


def tflite_interpreter_class() -> Any:
    """LiteRT's Interpreter, or tflite_runtime's (works only with numpy<2) as a fallback."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise RuntimeMissing(
                "LiteRT is not installed here: pip install ai-edge-litert (or tflite-runtime with numpy<2)"
            ) from exc
    return Interpreter


class TfliteRuntime:
    """A pool of LiteRT interpreters over one copy of the model bytes.

    An interpreter is not thread-safe, so each call checks one out of the pool and puts it back;
    a call that finds the pool empty makes another. ``pool_size`` interpreters are made and run
    once at load time (as many as there are worker threads), so that neither the first requests
    after a swap (~25 ms each for a 6 M-parameter SSD) nor the warm-up pay for making one.
    """

    def __init__(
        self, path: Path, threads: int = 1, pool_size: int = 1, wide_threads: int = 0, spawn: Spawn[Any] = _here,
    ) -> None:
        self._content = path.read_bytes()
        self._threads = max(1, threads)
        self._lock = threading.Lock()
        self._free: list[Any] = []
        first = self._new_interpreter()  # made now so that a bad model fails at load time
        inputs = first.get_input_details()
        outputs = first.get_output_details()
        self._inputs = {d["name"]: d["index"] for d in inputs}
        self._outputs = [(d["name"], d["index"]) for d in outputs]
        self._free.append(first)
        self._free.extend(self._new_interpreter() for _ in range(max(1, pool_size) - 1))
        # The wide lane: one more interpreter whose calls use every core, taken only by a lone request.
        # An interpreter's thread count is fixed when it is made, and XNNPACK packs the weights per
        # interpreter, so this costs one interpreter's memory (62 MB for the 24 MB SSD).
        self._wide: Any = None
        self._wide_busy = threading.Lock()
        if wide_threads > self._threads:
            self._wide = spawn(lambda: self._new_interpreter(wide_threads))
        quant = {d["name"]: tuple(float(v) for v in d["quantization"]) for d in inputs + outputs}
        self.signature = Signature(
            format="tflite",
            inputs=tuple(_tflite_spec(d) for d in inputs),
            outputs=tuple(_tflite_spec(d) for d in outputs),
            extra={"quantization": quant},
        )

    def _new_interpreter(self, threads: int = 0) -> Any:
        cls = tflite_interpreter_class()
        try:
            interp = cls(model_content=self._content, num_threads=threads or self._threads)
            interp.allocate_tensors()
            # The first invoke prepares the delegate's kernels: pay it here, not in a request.
            for d in interp.get_input_details():
                interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load the model: {_first_line(exc)}") from exc
        return interp

    def run(self, feeds: Mapping[str, np.ndarray], alone: bool = False) -> dict[str, np.ndarray]:
        wide = self._wide
        if alone and wide is not None and self._wide_busy.acquire(blocking=False):
            try:
                return self._invoke(wide, feeds)
            finally:
                self._wide_busy.release()
        with self._lock:
            interp = self._free.pop() if self._free else None
        if interp is None:
            interp = self._new_interpreter()
        try:
            return self._invoke(interp, feeds)
        finally:
            with self._lock:
                self._free.append(interp)

    def _invoke(self, interp: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            interp.set_tensor(self._inputs[name], value)
        interp.invoke()
        # get_tensor copies, so the result outlives the interpreter's next use.
        return {name: interp.get_tensor(index) for name, index in self._outputs}

    @property
    def has_wide_lane(self) -> bool:
        return self._wide is not None

    def close(self) -> None:
        with self._lock:
            self._free.clear()
        self._wide = None


def _tflite_spec(d: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(_dim(x) for x in d["shape"].tolist())
    return TensorSpec(str(d["name"]), shape, np.dtype(d["dtype"]).name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def open_runtime(
    path: Path, threads: int = 1, workers: int = 0, content_key: str | None = None, wide_threads: int = 0,
    spawn: Spawn[Any] = _here,
) -> Runtime:
    """Load a model file with the runtime its suffix names. ``workers``: how many threads will
    call ``run`` (a TFLite interpreter per thread is prepared up front). ``content_key``: a digest
    of the model's folder already known to the caller (ONNX cache key without re-reading it).

    Two lanes: calls use ``threads`` each (one per worker: several clients keep every core busy
    with no oversubscription), except a call made with ``alone=True`` (no other request in flight),
    which goes to a wide session or interpreter of ``wide_threads`` so that one camera's frame gets
    every core. No wide lane when ``wide_threads`` is not above ``threads``.

    ``spawn`` makes the wide lane: a runtime's intra-op threads are started when it is made, and on
    Linux a thread inherits the nice value of the thread that starts it. Models load on a niced
    thread (so loading yields to requests); a wide lane made there ran its second core at nice 10,
    starved by any busy neighbour, and was no faster than one thread (16.4 vs 16.5 ms per SSD
    request under load). The engine passes a spawner that runs on a thread of normal priority."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntime(path, threads, content_key=content_key, wide_threads=wide_threads, spawn=spawn)
    if suffix == ".tflite":
        return TfliteRuntime(path, threads, pool_size=max(1, workers), wide_threads=wide_threads, spawn=spawn)
    raise ModelLoadError(f"unsupported model file {path.name}: expected .onnx or .tflite")
