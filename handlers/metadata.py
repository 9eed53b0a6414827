"""What an exporter writes into the model file about the model: class names, input size, task.

Ultralytics' exporter (YOLOv5u, v8, v9, v10, 11, YOLO26, RT-DETR) stores its facts as ONNX
``metadata_props``, every value the ``str()`` of a Python object: ``names`` is a dict literal
(``"{0: 'person', 1: 'bicycle'}"``), ``imgsz`` a list (``"[320, 320]"``, height then width), ``task``
plain text (``detect``, ``segment``, ``classify``, ``pose``, ``obb``), ``stride`` a number. The
YOLOv5 repository's own exporter writes ``stride`` and ``names`` (a list or dict) only.

Values are read with ``ast.literal_eval``, never ``eval``: a model file is untrusted input. What
cannot be read is left out and named in ``problems`` (the loader logs them); reading never raises.
No numpy, no runtime: this module only parses text.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelMetadata", "parse_metadata"]

# A names value is a few kB for 80 COCO classes; past this it is not a label list worth parsing.
_MAX_VALUE_CHARS = 1 << 20
# Class ids beyond this are refused: names {10**9: 'x'} would otherwise build a list of 10**9 labels.
_MAX_CLASSES = 100_000
_MAX_NAME_CHARS = 200
_MAX_SIDE = 8192


@dataclass(frozen=True)
class ModelMetadata:
    """Facts a model file states about itself (all None when it states none)."""

    names: tuple[str, ...] | None = None
    imgsz: tuple[int, int] | None = None  # (width, height) the model was exported for
    task: str | None = None
    stride: int | None = None
    description: str = ""
    problems: tuple[str, ...] = ()  # entries present but unreadable, as one-line reasons

    @property
    def ultralytics(self) -> bool:
        """True for the Ultralytics (8.x and later) exporter, which states the task; the YOLOv5
        repository's exporter does not."""
        return self.task is not None

    @property
    def rtdetr(self) -> bool:
        """The exporter describes the model as an RT-DETR ("Ultralytics rtdetr-l model ...")."""
        return "rtdetr" in self.description.lower().replace("-", "")


def _literal(key: str, text: str, problems: list[str]) -> Any:
    if len(text) > _MAX_VALUE_CHARS:
        problems.append(f"metadata '{key}' is {len(text)} characters long; ignored")
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        problems.append(f"metadata '{key}' is not a Python literal; ignored")
        return None


def _whole(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _names(value: Any, problems: list[str]) -> tuple[str, ...] | None:
    """{0: 'person', 1: 'bicycle'} or ['person', 'bicycle'] -> ('person', 'bicycle'); ids missing
    from a dict are named class_<id>, as the loader names a class without a label."""
    if isinstance(value, list | tuple):
        value = dict(enumerate(value))
    if not isinstance(value, dict) or not value:
        problems.append("metadata 'names' is not a list or a dict of class names; ignored")
        return None
    ids = [_whole(int(k) if isinstance(k, str) and k.isdecimal() else k, 0, _MAX_CLASSES - 1) for k in value]
    if any(i is None for i in ids):
        problems.append(f"metadata 'names' has keys that are not class ids from 0 to {_MAX_CLASSES - 1}; ignored")
        return None
    named = {i: str(v).strip()[:_MAX_NAME_CHARS] for i, v in zip(ids, value.values(), strict=True) if i is not None}
    return tuple(named.get(i, f"class_{i}") for i in range(max(named) + 1))


def _imgsz(value: Any, problems: list[str]) -> tuple[int, int] | None:
    side = _whole(value, 1, _MAX_SIDE)
    if side is not None:
        return side, side
    if isinstance(value, list | tuple) and len(value) == 2:
        h, w = (_whole(v, 1, _MAX_SIDE) for v in value)
        if h is not None and w is not None:
            return w, h  # Ultralytics writes (height, width)
    problems.append("metadata 'imgsz' is not a size such as [640, 640]; ignored")
    return None


def parse_metadata(props: Mapping[str, str]) -> ModelMetadata:
    """Typed facts from a model's metadata key/value pairs (``metadata_props`` of an ONNX model)."""
    problems: list[str] = []
    names = imgsz = task = stride = None
    if "names" in props:
        raw = _literal("names", props["names"], problems)
        names = None if raw is None else _names(raw, problems)
    if "imgsz" in props:
        raw = _literal("imgsz", props["imgsz"], problems)
        imgsz = None if raw is None else _imgsz(raw, problems)
    if "task" in props:
        text = props["task"].strip()
        if text.isidentifier() and len(text) <= 40:
            task = text
        else:
            problems.append("metadata 'task' is not a task name; ignored")
    if "stride" in props:
        stride = _whole(_literal("stride", props["stride"], problems), 1, 1024)
    description = props.get("description", "")[:_MAX_NAME_CHARS]
    return ModelMetadata(names, imgsz, task, stride, description, tuple(problems))
