"""The external-data files an ONNX model names, read straight from its protobuf wire format.

An ONNX initializer may keep its bytes in another file (``external_data`` with a ``location``).
A crafted model can name ``../../etc/shadow`` or an absolute path; onnxruntime refuses those only
since its 2025-12 and 2026-03 fixes (microsoft/onnxruntime#26776, #27539), and its refusal echoes
the device's paths. The service checks every location itself, against the same rule as any other
path a package names, before a runtime opens the model.

No ``onnx`` package is needed (it is a test dependency only): the walk reads tags and lengths,
slicing over tensor bytes without copying them, through a memory map of the file.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ModelFormatError", "external_data_locations"]


class ModelFormatError(ValueError):
    """The file is not a well-formed ONNX protobuf."""


# message -> {field number: message type of that (length-delimited) field}, for the fields that can
# hold a TensorProto somewhere below them. Field numbers from onnx/onnx.proto3.
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNCTION, _ENTRY = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
    _ENTRY: {},
}
_MAX_NESTING = 64


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelFormatError("truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == 3:  # a (deprecated) group: valid protobuf in an unknown field, so skip it whole
            after = _skip_group(buf, pos, end, number)
        else:
            raise ModelFormatError(f"unsupported protobuf wire type {wire}")
        if after > end:
            raise ModelFormatError("truncated protobuf field")
        yield number, wire, pos, after
        pos = after


def _skip_group(buf: memoryview, pos: int, end: int, number: int) -> int:
    """The position after the end-group tag matching a start-group of field ``number``."""
    open_groups = [number]
    while open_groups:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire == 3:
            open_groups.append(field)
        elif wire == 4 and open_groups[-1] == field:
            open_groups.pop()
        else:
            raise ModelFormatError("malformed protobuf group")
        if pos > end:
            raise ModelFormatError("truncated protobuf group")
    return pos


def _locations(buf: memoryview) -> list[str]:
    found: list[str] = []
    stack = [(_MODEL, 0, len(buf), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise ModelFormatError("ONNX graphs nested too deep")
        if kind == _ENTRY:
            entry = {n: bytes(buf[s:e]) for n, w, s, e in _fields(buf, start, end) if w == 2 and n in (1, 2)}
            if entry.get(1) == b"location":
                found.append(entry.get(2, b"").decode("utf-8", "replace"))
            continue
        children = _CHILDREN[kind]
        for number, wire, s, e in _fields(buf, start, end):
            child = children.get(number)
            if child is not None and wire == 2:
                stack.append((child, s, e, depth + 1))
    return found


def external_data_locations(model: Path) -> list[str]:
    """Every ``location`` the model's tensors name (initializers, sparse ones, tensors in attributes,
    subgraphs and functions), as written in the file. Raises ModelFormatError for a malformed file."""
    with model.open("rb") as f:
        if f.seek(0, 2) == 0:
            raise ModelFormatError("the model file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _locations(view)
            finally:
                view.release()
