"""Benchmark models and images: realistic architectures with random weights, built offline.

Pretrained weights cannot be downloaded here, so the two detectors are rebuilt layer for layer
with random weights. Compute and memory (what a benchmark measures) depend on the architecture
and tensor sizes, not on the weight values.

- ``tiny_yolov3``: Darknet tiny-YOLOv3 (8.9 M parameters, 416x416, two heads, 2535 boxes) in
  torch 2.13 (CPU), exported to ONNX, then composed with ``onnx.helper`` into the ONNX model zoo
  tiny-yolov3-11 signature so the ``onnx_yolov3`` handler serves it unchanged: inputs ``input_1``
  [1,3,416,416] + ``image_shape`` [1,2]; outputs ``yolonms_layer_1`` boxes [1,2535,4] (y1,x1,y2,x2
  in image pixels: the graph undoes the letterbox like the zoo's), ``yolonms_layer_1:1`` scores
  [1,80,2535] and ``yolonms_layer_1:2`` indices [1,M,3] int32 from a real NonMaxSuppression node.
- ``ssd_mobilenet``: SSD300 on a MobileNetV2 backbone (inverted residuals, extra layers,
  1x1 box/class predictors on six maps, 1917 anchors, 90 classes + background; 6.0 M parameters),
  written straight as a TFLite flatbuffer with ``ai_edge_litert.schema_py_generated``
  (CONV_2D / DEPTHWISE_CONV_2D / ADD / RESHAPE / CONCATENATION / LOGISTIC) and ending in the
  ``TFLite_Detection_PostProcess`` custom op, options as a flexbuffer. No TensorFlow needed.
- images: scikit-image's astronaut (public domain) as a 640x480 photo and as a 12-megapixel
  4000x3000 JPEG (quality 90, upscaled with a little sensor-like grain so the file is the size of
  a real 12 MP photo, not of a smooth upscale).

Random weights give random scores; each model's score offset is calibrated on the 640x480 photo
so that a handful of boxes pass the default 0.5 threshold (realistic post-processing and JSON).

``python bench/models.py [--out bench/.cache]`` builds whatever is missing (idempotent).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["build_all", "build_images", "build_ssd_mobilenet", "build_tiny_yolov3", "package"]

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".cache"

_COCO80_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote "
    "keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
)
COCO80 = _COCO80_NAMES.split(" ")
# The TF detection zoo's 90-id COCO label map: ids with no class are "???".
_COCO90_GAPS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82}


def coco90() -> list[str]:
    names = iter(COCO80)
    return ["???" if i in _COCO90_GAPS else next(names) for i in range(1, 91)]


# -- images ------------------------------------------------------------------------------------------


def build_images(out: Path) -> dict[str, Path]:
    """photo_640x480.jpg and photo_12mp.jpg (4000x3000), both from skimage's astronaut."""
    import skimage.data
    from PIL import Image

    paths = {"small": out / "photo_640x480.jpg", "large": out / "photo_12mp.jpg"}
    if all(p.is_file() for p in paths.values()):
        return paths
    src = Image.fromarray(skimage.data.astronaut())  # 512x512, the face in the upper half
    small = src.resize((640, 640), Image.Resampling.LANCZOS).crop((0, 0, 640, 480))
    small.save(paths["small"], quality=90)
    big = src.resize((4000, 4000), Image.Resampling.BICUBIC).crop((0, 0, 4000, 3000))
    rng = np.random.default_rng(12)
    pixels = np.asarray(big, dtype=np.int16)
    pixels = pixels + rng.normal(0.0, 8.0, pixels.shape).astype(np.int16)
    big = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    big.save(paths["large"], quality=90)
    return paths


def letterbox_tensor(path: Path, size: int = 416) -> tuple[np.ndarray, np.ndarray]:
    """The zoo's tiny-YOLOv3 preprocessing (letterbox on gray 128, /255, NCHW) for calibration."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = min(size / w, size / h)
    nw, nh = round(w * scale), round(h * scale)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    x = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    return np.ascontiguousarray(x), np.array([[h, w]], dtype=np.float32)


# -- packages ----------------------------------------------------------------------------------------


def package(folder: Path, model_file: Path, labels: list[str], name: str, version: str, handler: str,
            activate: bool = True) -> Path:
    """A model package folder: the model file, labels.txt and model.json."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(model_file, folder / model_file.name)
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    manifest = {"name": name, "version": version, "handler": handler, "model": model_file.name,
                "labels": "labels.txt", "activate": activate}
    (folder / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# -- tiny-YOLOv3 (torch -> ONNX, zoo signature) -----------------------------------------------------

_TINY_ANCHORS = ((10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319))


def _tiny_yolov3_module(image_size: int = 416, classes: int = 80):
    import torch
    from torch import nn

    def conv(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)
        )

    class TinyYoloV3(nn.Module):
        """Darknet tiny-YOLOv3 (yolov3-tiny.cfg) with the keras-yolo3 box decoding the zoo model has."""

        def __init__(self) -> None:
            super().__init__()
            mp = nn.MaxPool2d(2, 2)
            self.stem = nn.Sequential(
                conv(3, 16, 3), mp, conv(16, 32, 3), mp, conv(32, 64, 3), mp, conv(64, 128, 3), mp,
                conv(128, 256, 3),
            )  # -> route 1 (26x26x256)
            self.deep = nn.Sequential(
                mp, conv(256, 512, 3), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(2, 1), conv(512, 1024, 3),
                conv(1024, 256, 1),
            )  # -> route 2 (13x13x256)
            out = 3 * (5 + classes)
            self.head1 = nn.Sequential(conv(256, 512, 3), nn.Conv2d(512, out, 1))
            self.lateral = nn.Sequential(conv(256, 128, 1), nn.Upsample(scale_factor=2, mode="nearest"))
            self.head2 = nn.Sequential(conv(384, 256, 3), nn.Conv2d(256, out, 1))
            self.classes = classes
            self.size = image_size

        def _decode(self, raw: torch.Tensor, anchors: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
            n, _, gh, gw = raw.shape
            c = self.classes
            p = raw.view(n, 3, 5 + c, gh, gw).permute(0, 3, 4, 1, 2).reshape(n, gh * gw * 3, 5 + c)
            gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, gh, gw, 1, 2).expand(1, gh, gw, 3, 2).reshape(1, -1, 2)
            anc = torch.tensor(anchors, dtype=torch.float32).view(1, 1, 3, 2).expand(1, gh * gw, 3, 2)
            xy = (torch.sigmoid(p[..., 0:2]) + grid.float()) / torch.tensor([gw, gh], dtype=torch.float32)
            wh = torch.exp(p[..., 2:4]) * anc.reshape(1, -1, 2) / float(self.size)
            conf = torch.sigmoid(p[..., 4:5]) * torch.sigmoid(p[..., 5:])
            return xy, wh, conf

        def forward(self, x: torch.Tensor, image_shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r1 = self.stem(x)
            r2 = self.deep(r1)
            y1 = self.head1(r2)
            y2 = self.head2(torch.cat((self.lateral(r2), r1), 1))
            parts = [self._decode(y1, _TINY_ANCHORS[3:6]), self._decode(y2, _TINY_ANCHORS[0:3])]
            xy = torch.cat([p[0] for p in parts], 1)[..., [1, 0]]  # -> (y, x)
            wh = torch.cat([p[1] for p in parts], 1)[..., [1, 0]]  # -> (h, w)
            conf = torch.cat([p[2] for p in parts], 1)
            # keras-yolo3 yolo_correct_boxes: undo the letterbox, scale to the image (h, w).
            shape = image_shape.view(1, 1, 2)
            new_shape = torch.round(shape * torch.min(self.size / shape))
            offset = (self.size - new_shape) / 2.0 / self.size
            scale = self.size / new_shape
            yx = (xy - offset) * scale
            hw = wh * scale
            boxes = torch.cat((yx - hw / 2.0, yx + hw / 2.0), -1) * torch.cat((shape, shape), -1)
            return boxes, conf.permute(0, 2, 1)

    return TinyYoloV3()


def _init_weights(module, seed: int) -> None:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            # Random but sane statistics, as a trained network has (keeps activations bounded).
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    # Predictors: logits spread like a trained head's (std ~2); the bias is calibrated afterwards.
    for head in (module.head1[1], module.head2[1]):
        nn.init.normal_(head.weight, 0.0, 2.0 / np.sqrt(head.in_channels * 4.0))
        nn.init.zeros_(head.bias)


def _calibrate_yolo(module, photo: Path, classes: int, wanted: int = 6, cut: float = 0.5) -> float:
    """Shift objectness and class biases so that about ``wanted`` (box, class) scores pass the
    score threshold ``cut`` before NMS."""
    import torch

    x, shape = letterbox_tensor(photo)
    stride = 5 + classes
    lo, hi = -10.0, 10.0
    with torch.no_grad():
        base = [h[1].bias.clone() for h in (module.head1, module.head2)]
        for _ in range(30):
            mid = (lo + hi) / 2
            for head, b in zip((module.head1, module.head2), base, strict=True):
                shift = torch.zeros_like(b)
                for a in range(3):
                    shift[a * stride + 4 : (a + 1) * stride] = mid
                head[1].bias.copy_(b + shift)
            _, scores = module(torch.from_numpy(x), torch.from_numpy(shape))
            count = int((scores > cut).sum())
            if count > wanted:
                hi = mid
            else:
                lo = mid
    return mid


def build_tiny_yolov3(out: Path, photo: Path, seed: int = 3) -> Path:
    """tiny_yolov3.onnx with the zoo tiny-yolov3-11 signature (one file, weights inside)."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    path = out / "tiny_yolov3.onnx"
    if path.is_file():
        return path
    classes = 80
    module = _tiny_yolov3_module(416, classes).eval()
    _init_weights(module, seed)
    _calibrate_yolo(module, photo, classes)
    params = sum(p.numel() for p in module.parameters())
    raw = out / "tiny_yolov3.torch.onnx"
    x, shape = letterbox_tensor(photo)
    # The TorchScript exporter writes one self-contained file; the dynamo one would put the
    # weights in a sidecar (fine for the service, but one file is simpler to package).
    torch.onnx.export(
        module, (torch.from_numpy(x), torch.from_numpy(shape)), str(raw), dynamo=False,
        input_names=["input_1", "image_shape"], output_names=["yolonms_layer_1", "yolonms_layer_1:1"],
        opset_version=17, do_constant_folding=True,
    )
    model = onnx.load(str(raw))
    raw.unlink()
    g = model.graph
    # The zoo graph ends in NonMaxSuppression (per class) and a [1,M,3] int32 index list.
    g.initializer.extend([
        helper.make_tensor("nms_max_per_class", TensorProto.INT64, [1], [20]),
        helper.make_tensor("nms_iou", TensorProto.FLOAT, [1], [0.5]),
        helper.make_tensor("nms_score", TensorProto.FLOAT, [1], [0.4]),
        helper.make_tensor("nms_unsqueeze_axes", TensorProto.INT64, [1], [0]),
    ])
    g.node.extend([
        helper.make_node("NonMaxSuppression",
                         ["yolonms_layer_1", "yolonms_layer_1:1", "nms_max_per_class", "nms_iou", "nms_score"],
                         ["nms_selected"], name="yolonms_nms", center_point_box=0),
        helper.make_node("Cast", ["nms_selected"], ["nms_selected_i32"], to=TensorProto.INT32, name="yolonms_cast"),
        helper.make_node("Unsqueeze", ["nms_selected_i32", "nms_unsqueeze_axes"], ["yolonms_layer_1:2"],
                         name="yolonms_unsqueeze"),
    ])
    g.output.append(helper.make_tensor_value_info("yolonms_layer_1:2", TensorProto.INT32, [1, "M", 3]))
    model.doc_string = f"bench: tiny-YOLOv3 architecture, random weights (seed {seed}), {params} parameters"
    onnx.checker.check_model(model)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


# -- SSD MobileNetV2 (TFLite flatbuffer, no TensorFlow) ---------------------------------------------


class _TfliteWriter:
    """A tiny builder over the TFLite object API: tensors, buffers, operators of one subgraph."""

    def __init__(self, seed: int) -> None:
        from ai_edge_litert import schema_py_generated as fb

        self.fb = fb
        self.rng = np.random.default_rng(seed)
        self.buffers = [fb.BufferT()]  # buffer 0: the empty sentinel
        self.tensors: list = []
        self.ops: list = []
        self.opcodes: list = []
        self._opcode_index: dict[tuple[int, str | None], int] = {}
        self.params = 0

    def tensor(self, name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t = self.fb.TensorT()
        t.name = name
        t.shape = list(shape)
        t.type = self.fb.TensorType.FLOAT32
        if data is not None:
            b = self.fb.BufferT()
            b.data = np.ascontiguousarray(data, dtype=np.float32).view(np.uint8).reshape(-1)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
            self.params += int(data.size)
        else:
            t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def opcode(self, builtin: int, custom: str | None = None) -> int:
        key = (builtin, custom)
        if key not in self._opcode_index:
            oc = self.fb.OperatorCodeT()
            oc.builtinCode = builtin
            oc.deprecatedBuiltinCode = min(builtin, 127)
            oc.version = 1
            if custom is not None:
                oc.customCode = custom
            self.opcodes.append(oc)
            self._opcode_index[key] = len(self.opcodes) - 1
        return self._opcode_index[key]

    def op(self, builtin: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None,
           custom: str | None = None, custom_options: bytes | None = None) -> None:
        o = self.fb.OperatorT()
        o.opcodeIndex = self.opcode(builtin, custom)
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = options_type, options
        if custom_options is not None:
            o.customOptions = list(custom_options)
            o.customOptionsFormat = self.fb.CustomOptionsFormat.FLEXBUFFERS
        self.ops.append(o)

    # layers ---------------------------------------------------------------------------------------

    def conv(self, x: int, shape: list[int], cout: int, k: int, stride: int, relu6: bool,
             name: str) -> tuple[int, list[int]]:
        fb = self.fb
        n, h, w, cin = shape
        std = np.sqrt(2.0 / (k * k * cin))
        wt = self.tensor(f"{name}/weights", [cout, k, k, cin], self.rng.normal(0, std, (cout, k, k, cin)))
        bs = self.tensor(f"{name}/bias", [cout], self.rng.normal(0, 0.01, cout))
        oh, ow = -(-h // stride), -(-w // stride)
        y = self.tensor(name, [n, oh, ow, cout])
        opt = fb.Conv2DOptionsT()
        opt.padding = fb.Padding.SAME
        opt.strideH = opt.strideW = stride
        opt.dilationHFactor = opt.dilationWFactor = 1
        opt.fusedActivationFunction = fb.ActivationFunctionType.RELU6 if relu6 else fb.ActivationFunctionType.NONE
        self.op(fb.BuiltinOperator.CONV_2D, [x, wt, bs], [y], fb.BuiltinOptions.Conv2DOptions, opt)
        return y, [n, oh, ow, cout]

    def dwconv(self, x: int, shape: list[int], stride: int, name: str) -> tuple[int, list[int]]:
        fb = self.fb
        n, h, w, c = shape
        wt = self.tensor(f"{name}/weights", [1, 3, 3, c], self.rng.normal(0, np.sqrt(2.0 / 9), (1, 3, 3, c)))
        bs = self.tensor(f"{name}/bias", [c], self.rng.normal(0, 0.01, c))
        oh, ow = -(-h // stride), -(-w // stride)
        y = self.tensor(name, [n, oh, ow, c])
        opt = fb.DepthwiseConv2DOptionsT()
        opt.padding = fb.Padding.SAME
        opt.strideH = opt.strideW = stride
        opt.depthMultiplier = 1
        opt.dilationHFactor = opt.dilationWFactor = 1
        opt.fusedActivationFunction = fb.ActivationFunctionType.RELU6
        self.op(fb.BuiltinOperator.DEPTHWISE_CONV_2D, [x, wt, bs], [y], fb.BuiltinOptions.DepthwiseConv2DOptions, opt)
        return y, [n, oh, ow, c]

    def add(self, a: int, b: int, shape: list[int], name: str) -> int:
        fb = self.fb
        y = self.tensor(name, shape)
        opt = fb.AddOptionsT()
        opt.fusedActivationFunction = fb.ActivationFunctionType.NONE
        self.op(fb.BuiltinOperator.ADD, [a, b], [y], fb.BuiltinOptions.AddOptions, opt)
        return y

    def reshape(self, x: int, new_shape: list[int], name: str) -> int:
        fb = self.fb
        y = self.tensor(name, new_shape)
        opt = fb.ReshapeOptionsT()
        opt.newShape = list(new_shape)
        self.op(fb.BuiltinOperator.RESHAPE, [x], [y], fb.BuiltinOptions.ReshapeOptions, opt)
        return y

    def concat(self, xs: list[int], shape: list[int], axis: int, name: str) -> int:
        fb = self.fb
        y = self.tensor(name, shape)
        opt = fb.ConcatenationOptionsT()
        opt.axis = axis
        opt.fusedActivationFunction = fb.ActivationFunctionType.NONE
        self.op(fb.BuiltinOperator.CONCATENATION, xs, [y], fb.BuiltinOptions.ConcatenationOptions, opt)
        return y

    def model(self, inputs: list[int], outputs: list[int], description: str):
        fb = self.fb
        sg = fb.SubGraphT()
        sg.tensors, sg.operators, sg.inputs, sg.outputs, sg.name = self.tensors, self.ops, inputs, outputs, "main"
        m = fb.ModelT()
        m.version = 3
        m.operatorCodes = self.opcodes
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.description = description
        return m


def _ssd_anchors(sizes: list[int], per_cell: list[int]) -> np.ndarray:
    """SSD anchors (ycenter, xcenter, h, w), normalised, in the predictors' output order."""
    scales = np.linspace(0.2, 0.95, len(sizes))
    out = []
    for i, (g, a) in enumerate(zip(sizes, per_cell, strict=True)):
        s = scales[i]
        s_next = scales[i + 1] if i + 1 < len(scales) else 1.0
        if a == 3:
            shapes = [(0.1, 1.0), (s, 2.0), (s, 0.5)]
        else:
            shapes = [(s, 1.0), (s, 2.0), (s, 0.5), (s, 3.0), (s, 1 / 3), (np.sqrt(s * s_next), 1.0)]
        for y in range(g):
            for x in range(g):
                for scale, ratio in shapes:
                    out.append(((y + 0.5) / g, (x + 0.5) / g, scale / np.sqrt(ratio), scale * np.sqrt(ratio)))
    return np.asarray(out, dtype=np.float32)


def build_ssd_mobilenet(out: Path, photo: Path, seed: int = 5) -> Path:
    """ssd_mobilenet.tflite: SSD300 MobileNetV2, float input [-1, 1], TFLite_Detection_PostProcess."""
    from ai_edge_litert.tools import flatbuffer_utils
    from flatbuffers import flexbuffers

    path = out / "ssd_mobilenet.tflite"
    if path.is_file():
        return path
    w = _TfliteWriter(seed)
    fb = w.fb
    size, classes = 300, 90
    x = w.tensor("normalized_input_image_tensor", [1, size, size, 3])
    inp = x
    y, shape = w.conv(x, [1, size, size, 3], 32, 3, 2, True, "Conv")
    # MobileNetV2: (expansion t, channels c, repeats n, stride s)
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    features: list[tuple[int, list[int]]] = []
    block = 0
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            cin = shape[3]
            h = y
            hs = shape
            if t != 1:
                h, hs = w.conv(h, hs, cin * t, 1, 1, True, f"block{block}/expand")
                if block == 13:  # stride-16 map (19x19x576): SSD's first feature map
                    features.append((h, hs))
            h, hs = w.dwconv(h, hs, stride, f"block{block}/depthwise")
            h, hs = w.conv(h, hs, c, 1, 1, False, f"block{block}/project")
            if stride == 1 and cin == c:
                h = w.add(y, h, hs, f"block{block}/add")
            y, shape = h, hs
            block += 1
    y, shape = w.conv(y, shape, 1280, 1, 1, True, "Conv_1")
    features.append((y, shape))  # 10x10x1280
    for i, (mid, cout) in enumerate([(256, 512), (128, 256), (128, 256), (64, 128)]):
        y, shape = w.conv(y, shape, mid, 1, 1, True, f"extra{i}/1x1")
        y, shape = w.conv(y, shape, cout, 3, 2, True, f"extra{i}/3x3_s2")
        features.append((y, shape))  # 5x5, 3x3, 2x2, 1x1
    per_cell = [3, 6, 6, 6, 6, 6]
    boxes, logits, total = [], [], 0
    for i, ((f, fs), a) in enumerate(zip(features, per_cell, strict=True)):
        n_anchors = fs[1] * fs[2] * a
        total += n_anchors
        b, _ = w.conv(f, fs, a * 4, 1, 1, False, f"BoxPredictor_{i}/BoxEncodingPredictor")
        boxes.append(w.reshape(b, [1, n_anchors, 4], f"BoxPredictor_{i}/Reshape"))
        c, _ = w.conv(f, fs, a * (classes + 1), 1, 1, False, f"BoxPredictor_{i}/ClassPredictor")
        logits.append(w.reshape(c, [1, n_anchors, classes + 1], f"BoxPredictor_{i}/Reshape_1"))
    box_enc = w.concat(boxes, [1, total, 4], 1, "concat")
    cls_logits = w.concat(logits, [1, total, classes + 1], 1, "concat_1")
    cls_scores = w.tensor("raw_outputs/class_predictions", [1, total, classes + 1])
    w.op(fb.BuiltinOperator.LOGISTIC, [cls_logits], [cls_scores])
    sizes = [fs[1] for _, fs in features]
    anchors = w.tensor("anchors", [total, 4], _ssd_anchors(sizes, per_cell))
    w.params -= total * 4  # anchors are constants, not parameters
    outs = [
        w.tensor("TFLite_Detection_PostProcess", [1, 10, 4]),
        w.tensor("TFLite_Detection_PostProcess:1", [1, 10]),
        w.tensor("TFLite_Detection_PostProcess:2", [1, 10]),
        w.tensor("TFLite_Detection_PostProcess:3", [1]),
    ]
    options = flexbuffers.Dumps({
        "max_detections": 10, "max_classes_per_detection": 1, "detections_per_class": 100,
        "use_regular_nms": False, "nms_score_threshold": 1e-8, "nms_iou_threshold": 0.6,
        "num_classes": classes, "y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0, "w_scale": 5.0,
    })
    w.op(fb.BuiltinOperator.CUSTOM, [box_enc, cls_scores, anchors], outs,
         custom="TFLite_Detection_PostProcess", custom_options=bytes(options))
    # Calibrate the class-logit bias so that a few detections pass 0.5 on the photo.
    model = w.model([inp], outs, f"bench: SSD300 MobileNetV2 architecture, random weights (seed {seed}), "
                                 f"{w.params} parameters")
    conv = w.opcode(fb.BuiltinOperator.CONV_2D)
    predictors = {
        kind: [(w.tensors[op.inputs[1]].buffer, w.tensors[op.inputs[2]].buffer) for op in w.ops
               if op.opcodeIndex == conv and w.tensors[op.outputs[0]].name.endswith(kind)]
        for kind in ("ClassPredictor", "BoxEncodingPredictor")
    }
    _calibrate_ssd(model, predictors, classes, photo, path, flatbuffer_utils)
    return path


def _calibrate_ssd(model, predictors: dict[str, list[tuple[int, int]]], classes: int, photo: Path,
                   path: Path, flatbuffer_utils) -> None:
    """Scale the predictors so logits spread like a trained model's (std ~2 for classes, ~1 for
    box encodings), then shift the class bias until a few detections pass 0.5 on the photo."""
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    img = Image.open(photo).convert("RGB").resize((300, 300), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32)[None] / 127.5 - 1.0).astype(np.float32)

    def run(preserve: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
        content = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
        interp = Interpreter(model_content=content, num_threads=2, experimental_preserve_all_tensors=preserve)
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        names = ("concat", "concat_1", "TFLite_Detection_PostProcess:2")
        found = {d["name"]: d["index"] for d in interp.get_tensor_details() if d["name"] in names}
        return content, {n: interp.get_tensor(i) for n, i in found.items() if preserve or n == names[2]}

    def buf(b: int) -> np.ndarray:
        return model.buffers[b].data.view(np.float32)

    _, out = run(preserve=True)
    for kind, tensor, target in (("ClassPredictor", "concat_1", 2.0), ("BoxEncodingPredictor", "concat", 1.0)):
        k = np.float32(target / max(float(out[tensor].std()), 1e-6))
        for wb, bb in predictors[kind]:
            model.buffers[wb].data = (buf(wb) * k).view(np.uint8)
            model.buffers[bb].data = (buf(bb) * k).view(np.uint8)
    originals = {bb: buf(bb).copy() for _, bb in predictors["ClassPredictor"]}
    lo, hi = -8.0, 8.0
    content = b""
    for _ in range(20):
        mid = (lo + hi) / 2
        for bb, orig in originals.items():
            shifted = orig.copy()
            shifted[np.arange(shifted.size) % (classes + 1) != 0] += mid  # column 0: background
            model.buffers[bb].data = shifted.view(np.uint8)
        content, out = run()
        passed = int((out["TFLite_Detection_PostProcess:2"] > 0.5).sum())
        if passed > 4:
            hi = mid
        elif passed < 3:
            lo = mid
        else:
            break
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


# -- everything ---------------------------------------------------------------------------------------


def build_all(out: Path = DEFAULT_OUT) -> dict[str, Path]:
    """Images, models and the packages run.py serves (two versions of each model, for swaps)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = build_images(out)
    yolo = build_tiny_yolov3(out, images["small"])
    ssd = build_ssd_mobilenet(out, images["small"])
    bundled = HERE.parent / "supervisor" / "bundled" / "blazeface-short-range"
    pkgs = out / "packages"
    made = {}
    for version in ("1", "2"):
        made[f"tiny-yolov3-{version}"] = package(pkgs / f"tiny-yolov3-v{version}", yolo, COCO80, "tiny-yolov3",
                                                 version, "onnx_yolov3", activate=version == "1")
        made[f"ssd-mobilenet-{version}"] = package(pkgs / f"ssd-mobilenet-v{version}", ssd, coco90(),
                                                   "ssd-mobilenet", version, "tflite_ssd", activate=version == "1")
        made[f"blazeface-{version}"] = package(
            pkgs / f"blazeface-v{version}", bundled / "face_detection_short_range.tflite",
            (bundled / "labels.txt").read_text().split(),
            "blazeface-bench", version, "blazeface", activate=version == "1")
    (out / "stamp.json").write_text(json.dumps({"built_s": round(time.perf_counter() - t0, 1)}) + "\n")
    return {**images, "tiny_yolov3": yolo, "ssd_mobilenet": ssd, **made}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for name, path in build_all(args.out).items():
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{name:<18} {size / 1e6:7.2f} MB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
