"""Model runtimes behind one small interface: onnxruntime for ONNX, LiteRT for TFLite.

An ``onnxruntime.InferenceSession`` is thread-safe and is shared by the worker threads. A TFLite
interpreter is not: each worker thread gets its own, created on first use from the same model
bytes (held once in memory).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from handlers.base import Signature, TensorSpec

__all__ = ["ModelLoadError", "Runtime", "open_runtime", "tflite_interpreter_class"]

log = structlog.get_logger(__name__)


class ModelLoadError(Exception):
    """The model file cannot be loaded by its runtime."""


class Runtime(Protocol):
    signature: Signature

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


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
    """One shared onnxruntime session."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # intra-op threads per call; the engine's pool gives concurrency across calls.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            # Loading by path lets onnxruntime find external-data sidecars beside the model.
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several private exception types
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {_first_line(exc)}") from exc
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
        )
        self._output_names = [o.name for o in self.signature.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        del self._session


def tflite_interpreter_class() -> Any:
    """LiteRT's Interpreter, or tflite_runtime's (works only with numpy<2) as a fallback."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise ModelLoadError(
                "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime with numpy<2)"
            ) from exc
    return Interpreter


class TfliteRuntime:
    """A pool of LiteRT interpreters over one copy of the model bytes.

    An interpreter is not thread-safe, so each call checks one out of the pool and puts it back;
    a call that finds the pool empty makes another. ``pool_size`` interpreters are made and run
    once at load time (as many as there are worker threads), so that neither the first requests
    after a swap (~25 ms each for a 6 M-parameter SSD) nor the warm-up pay for making one.
    """

    def __init__(self, path: Path, threads: int = 1, pool_size: int = 1) -> None:
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
        quant = {d["name"]: tuple(float(v) for v in d["quantization"]) for d in inputs + outputs}
        self.signature = Signature(
            format="tflite",
            inputs=tuple(_tflite_spec(d) for d in inputs),
            outputs=tuple(_tflite_spec(d) for d in outputs),
            extra={"quantization": quant},
        )

    def _new_interpreter(self) -> Any:
        cls = tflite_interpreter_class()
        try:
            interp = cls(model_content=self._content, num_threads=self._threads)
            interp.allocate_tensors()
            # The first invoke prepares the delegate's kernels: pay it here, not in a request.
            for d in interp.get_input_details():
                interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load the model: {_first_line(exc)}") from exc
        return interp

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interp = self._free.pop() if self._free else None
        if interp is None:
            interp = self._new_interpreter()
        try:
            for name, value in feeds.items():
                interp.set_tensor(self._inputs[name], value)
            interp.invoke()
            # get_tensor copies, so the result outlives the interpreter's next use.
            return {name: interp.get_tensor(index) for name, index in self._outputs}
        finally:
            with self._lock:
                self._free.append(interp)

    def close(self) -> None:
        with self._lock:
            self._free.clear()


def _tflite_spec(d: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(_dim(x) for x in d["shape"].tolist())
    return TensorSpec(str(d["name"]), shape, np.dtype(d["dtype"]).name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def open_runtime(path: Path, threads: int = 1, workers: int = 0) -> Runtime:
    """Load a model file with the runtime its suffix names. ``workers``: how many threads will
    call ``run`` (a TFLite interpreter per thread is prepared up front)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntime(path, threads)
    if suffix == ".tflite":
        return TfliteRuntime(path, threads, pool_size=max(1, workers))
    raise ModelLoadError(f"unsupported model file {path.name}: expected .onnx or .tflite")
