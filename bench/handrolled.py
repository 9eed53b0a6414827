"""The hand-rolled app a team would write instead of this service: the baseline of bench/sidebyside.py.

A Flask app that loads one model at start (one LiteRT interpreter on every core behind a lock, or one
onnxruntime session, which is thread-safe), decodes with OpenCV, and returns JSON. No repository, no
checks, no swaps: only the request path, as short as it can be written.

    python bench/handrolled.py MODEL_FILE PORT
"""

from __future__ import annotations

import os
import sys
import threading

import cv2
import numpy as np
from flask import Flask, jsonify, request

model_path, port = sys.argv[1], int(sys.argv[2])
app = Flask(__name__)
lock = threading.Lock()

if model_path.endswith(".tflite"):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=model_path, num_threads=os.cpu_count())
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    h, w = int(inp["shape"][1]), int(inp["shape"][2])
    outs = [d["index"] for d in interp.get_output_details()]

    def infer(img: np.ndarray) -> list[dict[str, object]]:
        x = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (w, h)).astype(np.float32) / 127.5 - 1.0
        with lock:
            interp.set_tensor(inp["index"], x[None])
            interp.invoke()
            boxes, classes, scores, count = (interp.get_tensor(i) for i in outs)
        return [{"class_id": int(classes[0, i]), "score": float(scores[0, i]), "box": boxes[0, i].tolist()}
                for i in range(int(count[0])) if scores[0, i] >= 0.5]
else:
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])

    def infer(img: np.ndarray) -> list[dict[str, object]]:
        ih, iw = img.shape[:2]
        s = min(416 / iw, 416 / ih)
        nw, nh = int(iw * s), int(ih * s)
        canvas = np.full((416, 416, 3), 128, np.uint8)
        top, left = (416 - nh) // 2, (416 - nw) // 2
        canvas[top:top + nh, left:left + nw] = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (nw, nh))
        x = (canvas.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        boxes, scores, idx = session.run(None, {"input_1": x, "image_shape": np.array([[ih, iw]], np.float32)})
        return [{"class_id": int(c), "score": float(scores[b, c, i]), "box": boxes[b, i].tolist()}
                for b, c, i in idx.reshape(-1, 3)]


@app.post("/detect")
def detect():  # type: ignore[no-untyped-def]
    img = cv2.imdecode(np.frombuffer(request.get_data(), np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return jsonify(error="not an image"), 400
    return jsonify(detections=infer(img))


@app.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return "ok"


if __name__ == "__main__":
    app.run("127.0.0.1", port, threaded=True)
