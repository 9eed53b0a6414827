"""Reasons a user can act on: why a package was refused or a model failed, as shown in ``/models``,
``reason.json``, the twin's reported ``Reason`` and ``edgeloader verify``.

A runtime's own error is long and written for its developers: ``[ONNXRuntimeError] : 7 :
INVALID_PROTOBUF : Load model from /iotedge/storage/staging/.tmp-3f2a…/model.onnx failed:Protobuf
parsing failed.``. Shown to a user it becomes ``Protobuf parsing failed``: paths are made relative
to the package (the device's folders mean nothing to whoever sent it, and a temporary folder's name
means nothing to anyone), the runtime's boilerplate goes, and the result is cut to ``MAX_REASON``
characters. The full text goes to the log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["MAX_REASON", "clip", "package_relative", "shorten_runtime_message", "user_reason"]

# Reported properties are small (IoT Hub allows 32 KB for the whole document); a reason is a line.
MAX_REASON = 200

# onnxruntime's prefix "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : " and what follows it.
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_ORT_LOAD = re.compile(r"Load model from \S+ failed:\s*")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'[^']*' Status Message:\s*")
# A C++ source location and function signature inside a message ("/onnxruntime_src/…/x.h:40 f(…) … ").
_CPP_LOCATION = re.compile(r"\S+\.(?:h|hpp|cc|cpp|c):\d+\s+(?:\S+\([^)]*\)\s*(?:[^.]*? was false\.\s*)?)?")
_BOILERPLATE = (" Please fix either the inputs/outputs or the model.", " Please fix either the inputs or the model.")
_SPACES = re.compile(r"\s+")


def shorten_runtime_message(text: str) -> str:
    """A runtime's error reduced to what it says about the model: one line, no boilerplate."""
    text = _SPACES.sub(" ", text).strip()
    for filler in _BOILERPLATE:
        text = text.replace(filler, "")
    text = _ORT_PREFIX.sub("", text)
    text = _ORT_LOAD.sub("", text)
    text = _ORT_NODE.sub(lambda m: f"{m.group(1)} node: ", text)
    return _CPP_LOCATION.sub("", text).strip()


def _forms(folder: Path) -> list[str]:
    """The ways a folder's path may be written in a message: as given, absolute, resolved."""
    forms = {str(folder), os.path.abspath(folder)}
    try:
        forms.add(str(folder.resolve()))
    except OSError:
        pass
    return sorted((f for f in forms if f not in ("", ".", "/")), key=len, reverse=True)


def package_relative(text: str, *folders: Path) -> str:
    """``text`` with each ``folder/`` prefix removed: paths read relative to the package."""
    for folder in folders:
        for form in _forms(folder):
            text = text.replace(form.rstrip("/") + "/", "").replace(form, ".")
    return text


def _data_dir_relative(text: str, data_dir: Path) -> str:
    for form in _forms(data_dir):
        prefix = re.escape(form.rstrip("/"))
        # A version being built or deleted (staging/.tmp-…/) or installed (models/<name>/<version>/):
        # what follows is a path inside the package.
        text = re.sub(prefix + r"/staging/\.tmp-[^/\s'\"]*/?", "", text)
        text = re.sub(prefix + r"/models/[^/\s'\"]+/[^/\s'\"]+/", "", text)
        text = re.sub(prefix + r"/(?:inbox|staging|quarantine)/", "", text)
        text = text.replace(form, "<data-dir>")
    return text


def clip(text: str, limit: int = MAX_REASON) -> str:
    """At most ``limit`` characters, cut at a word where one is near."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit * 0.7 else cut).rstrip(" ,;:") + "…"


def user_reason(text: str, data_dir: Path | None = None, *package_dirs: Path) -> str:
    """The reason to show a user: package-relative, free of the data directory's path, the runtime's
    message shortened, at most ``MAX_REASON`` characters."""
    text = package_relative(text, *package_dirs)
    if data_dir is not None:
        text = _data_dir_relative(text, data_dir)
    return clip(shorten_runtime_message(text))
