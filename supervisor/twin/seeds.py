"""The chunks a device already holds: its stored versions' files, cut as a package's index says.

Each stored file is cut once per chunking (package/chunking.py) and the list kept in
``staging/.chunk-cache/<file SHA-256>.json``: a stored file never changes (its SHA-256 is in the
install record), and one of the same content in another version shares the entry. Entries of files
no longer stored are removed. Blocking: run in a worker thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from supervisor.formats import CHUNK_CACHE_DIR
from supervisor.package.chunking import ChunkParams, chunk_file

__all__ = ["LocalChunk", "local_chunks"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LocalChunk:
    path: Path
    offset: int
    length: int


def _cached(cache: Path, path: Path, sha256: str, params: ChunkParams) -> list[tuple[int, int, str]]:
    entry = cache / f"{sha256}.json"
    try:
        doc = json.loads(entry.read_text("utf-8"))
        if doc.get("chunking") == params.to_json() and doc.get("size") == path.stat().st_size:
            return [(int(o), int(n), str(d)) for o, n, d in doc["chunks"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    chunks = [(c.offset, c.length, c.digest) for c in chunk_file(path, params)]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + ".part")
        tmp.write_text(json.dumps({"chunking": params.to_json(), "size": path.stat().st_size, "chunks": chunks}),
                       "utf-8")
        os.replace(tmp, entry)
    except OSError as exc:  # a full disk makes the next update cut the file again, nothing worse
        log.warning("chunk_cache_not_written", error=str(exc))
    return chunks


def local_chunks(
    files: list[tuple[Path, str]], params: ChunkParams, wanted: set[str], staging: Path
) -> dict[str, LocalChunk]:
    """Where each chunk digest of ``wanted`` lies in the stored ``files`` ((path, SHA-256) pairs)."""
    cache = staging / CHUNK_CACHE_DIR
    found: dict[str, LocalChunk] = {}
    keep: set[str] = set()
    for path, sha256 in files:
        keep.add(f"{sha256}.json")
        try:
            chunks = _cached(cache, path, sha256, params)
        except OSError as exc:  # removed meanwhile (pruned): not a seed
            log.info("seed_file_unreadable", file=path.name, error=str(exc))
            continue
        for offset, length, digest in chunks:
            if digest in wanted and digest not in found:
                found[digest] = LocalChunk(path, offset, length)
    try:
        for entry in os.scandir(cache):
            if entry.name not in keep:
                os.unlink(entry.path)
    except OSError:
        pass
    return found
