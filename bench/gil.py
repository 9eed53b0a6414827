"""How long each runtime call holds the GIL: a ticker thread wakes every 0.5 ms and records the
longest gap while the main thread makes a model's runtime objects. A long gap means every other
Python thread (the event loop, the other inference workers' pre/post-processing) waits that long.

    .venv/bin/python bench/gil.py            # the bench models in bench/.cache (run make bench once)

Prints, per call, its wall time and the longest gap the ticker saw.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handlers.runtimes import tflite_interpreter_class

PACKAGES = Path(__file__).resolve().parent / ".cache" / "packages"


class Ticker:
    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now
            time.sleep(0.0005)

    def __enter__(self) -> Ticker:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()

    def measure(self, label: str, call: Callable[[], Any]) -> Any:
        self.gaps.clear()
        start = time.perf_counter()
        result = call()
        wall = time.perf_counter() - start
        time.sleep(0.005)  # let the ticker record the gap that ends after the call
        print(f"  {label:<28} {wall * 1000:7.1f} ms   longest GIL gap {max(self.gaps) * 1000:6.1f} ms")
        return result


def tflite(model: Path, ticker: Ticker) -> None:
    interpreter_class = tflite_interpreter_class()
    content = model.read_bytes()
    interp = ticker.measure("Interpreter(...)", lambda: interpreter_class(model_content=content, num_threads=1))
    ticker.measure("allocate_tensors()", interp.allocate_tensors)
    detail = interp.get_input_details()[0]
    feed = np.zeros(detail["shape"], dtype=detail["dtype"])
    interp.set_tensor(detail["index"], feed)
    ticker.measure("invoke() first", interp.invoke)
    ticker.measure("invoke() again", interp.invoke)


def onnx(model: Path, ticker: Ticker) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ticker.measure("InferenceSession(...)", lambda: ort.InferenceSession(
        str(model), sess_options=opts, providers=["CPUExecutionProvider"]))
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        dtype = np.float32 if "float" in spec.type else np.int64
        feeds[spec.name] = np.ones(shape, dtype=dtype) * (416 if spec.name == "image_shape" else 0.5)
    ticker.measure("run() first", lambda: session.run(None, feeds))
    ticker.measure("run() again", lambda: session.run(None, feeds))


def main() -> int:
    models = sorted(PACKAGES.glob("*-v1/*.tflite")) + sorted(PACKAGES.glob("tiny-yolov3-v1/*.onnx"))
    if not models:
        print(f"no models in {PACKAGES}: run `make bench` (or bash bench/setup.sh) first", file=sys.stderr)
        return 1
    with Ticker() as ticker:
        for model in models:
            print(f"{model.parent.name}/{model.name}")
            (onnx if model.suffix == ".onnx" else tflite)(model, ticker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
