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
    """LiteRT interpreters, one per thread, over one copy of the model bytes."""

    def __init__(self, path: Path, threads: int = 1, spares: int = 0) -> None:
        self._content = path.read_bytes()
        self._threads = max(1, threads)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Any] = []
        self._spares: list[Any] = []
        interp = self._interpreter()  # load once now so that a bad model fails at load time
        # Interpreters made and run once here, at load time, for the worker threads to take on
        # their first request: made there, each cost the first request after a swap ~25 ms.
        self._spares.extend(self._new_interpreter(warm=True) for _ in range(spares))
        inputs = interp.get_input_details()
        outputs = interp.get_output_details()
        quant = {d["name"]: tuple(float(v) for v in d["quantization"]) for d in inputs + outputs}
        self.signature = Signature(
            format="tflite",
            inputs=tuple(_tflite_spec(d) for d in inputs),
            outputs=tuple(_tflite_spec(d) for d in outputs),
            extra={"quantization": quant},
        )

    def _new_interpreter(self, warm: bool = False) -> Any:
        cls = tflite_interpreter_class()
        try:
            interp = cls(model_content=self._content, num_threads=self._threads)
            interp.allocate_tensors()
            if warm:
                for d in interp.get_input_details():
                    interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
                interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load the model: {_first_line(exc)}") from exc
        return interp

    def _interpreter(self) -> Any:
        interp = getattr(self._local, "interp", None)
        if interp is None:
            with self._lock:
                spare = self._spares.pop() if self._spares else None
            interp = spare if spare is not None else self._new_interpreter()
            self._local.interp = interp
            self._local.inputs = {d["name"]: d["index"] for d in interp.get_input_details()}
            self._local.outputs = [(d["name"], d["index"]) for d in interp.get_output_details()]
            with self._lock:
                self._all.append(interp)
        return interp

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interpreter()
        for name, value in feeds.items():
            interp.set_tensor(self._local.inputs[name], value)
        interp.invoke()
        # get_tensor copies, so the result outlives the next invoke on this thread.
        return {name: interp.get_tensor(index) for name, index in self._local.outputs}

    def close(self) -> None:
        with self._lock:
            self._all.clear()
            self._spares.clear()
        self._local = threading.local()


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
        return TfliteRuntime(path, threads, spares=workers)
    raise ModelLoadError(f"unsupported model file {path.name}: expected .onnx or .tflite")
