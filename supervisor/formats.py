"""Names and constants of the on-disk formats, in one place: the model package, the sidecars a
sender puts beside it, and the repository layout; plus the two digest forms senders write.

Dependency-free on purpose: the drop-folder watcher, ``edgeloader pack`` and ``edgeloader
twin-patch`` import it without pulling in a runtime (onnxruntime, LiteRT) or aiohttp.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = [
    "ACTIVATED_MARKER",
    "ACTIVATIONS_FILE",
    "CHECKSUM_SUFFIXES",
    "CHUNK_CACHE_DIR",
    "CHUNK_INDEX_MEMBER",
    "INSTALL_RECORD",
    "INTENT_SUFFIX",
    "LABEL_FILE_NAMES",
    "MANIFEST_NAME",
    "MODEL_SUFFIXES",
    "REASON_FILE",
    "SCHEMA_FILE",
    "SIDECAR_SUFFIXES",
    "SIGNATURE_NAME",
    "TMP_PREFIX",
    "parse_md5",
    "parse_sha256",
]

# -- a model package ---------------------------------------------------------------------------------
MANIFEST_NAME = "model.json"
MODEL_SUFFIXES = (".onnx", ".tflite")
LABEL_FILE_NAMES = ("labels.txt", "labelmap.txt", "coco_classes.txt")
# The last member of a package written by `edgeloader pack`: where the chunks of its big files lie
# (package/indexed.py). A dot-name: unpacked with the rest, but never taken for package content.
CHUNK_INDEX_MEMBER = ".edgeloader-chunks.json"

# The package's signature (model-signing format: a Sigstore bundle over the files' SHA-256), at its root.
SIGNATURE_NAME = "model.sig"
# The JSON Schema of model.json, published in the repository (docs/) for editors.
SCHEMA_FILE = "model.schema.json"

# -- sidecars beside a package (same name + suffix) ---------------------------------------------------
# Written by the twin before it renames a download into staging/: source, hashes, activate, size.
INTENT_SUFFIX = ".intent.json"
# Written by a sender beside a dropped package: the package's SHA-256 or MD5 (``sha256sum`` output).
CHECKSUM_SUFFIXES = (".sha256", ".md5")
SIDECAR_SUFFIXES = (INTENT_SUFFIX, *CHECKSUM_SUFFIXES)

# -- the repository ------------------------------------------------------------------------------------
# Inside models/<name>/<version>/: the install record (written last) and the first-activation marker.
INSTALL_RECORD = ".edgeloader.json"
ACTIVATED_MARKER = ".activated"
# Folders and links being built or deleted; removed by the start-up repair after a crash.
TMP_PREFIX = ".tmp-"
# Inside quarantine/<entry>/: why the package was refused.
REASON_FILE = "reason.json"
# In staging/: the chunk lists of stored files (by SHA-256), so that each is cut once (twin/seeds.py).
CHUNK_CACHE_DIR = ".chunk-cache"
# In the data dir: the versions activated, in order (what a rollback walks back through).
ACTIVATIONS_FILE = "activations.json"


def parse_sha256(value: str) -> str:
    """A SHA-256 given as hex (any case). Returns lower-case hex; raises ValueError otherwise."""
    text = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError("ContentSHA256 must be 64 hex digits")
    return text


def parse_md5(value: str) -> bytes:
    """An MD5 given as base64 (Azure's Content-MD5) or as 32 hex digits. Returns the 16 raw bytes."""
    text = value.strip()
    if re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError("ContentMD5 must be base64 (as Azure Blob gives it) or 32 hex digits")
    return raw
