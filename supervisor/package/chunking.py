"""Content-defined chunking of model files: the same bytes cut at the same places wherever they lie.

A file is cut where a rolling hash of the last ``WINDOW`` bytes falls below a threshold (probability
``2**-bits`` per byte), with a minimum and a maximum chunk size. Cuts depend only on the bytes near
them, so a tensor whose bytes are unchanged is cut into the same chunks in a new version of the model
even when what comes before it grew or shrank (an insertion shifts every fixed-size chunk after it;
here only the chunk holding it changes). ``edgeloader pack`` chunks the model file this way; the device
chunks its stored versions with the same parameters and fetches only chunks it does not hold.

The hash is a polynomial one over 64-bit words, ``H_i = sum_k G[b(i-k)] * P**k mod 2**64`` for k < WINDOW,
with ``G`` a fixed table of 256 random words: computed for a whole block at once with numpy (prefix sums
of ``G[b_j] * P**-j``), about 10 ms per MiB, where a byte-at-a-time loop in Python would take seconds.
The top bits decide (the low bits of a product mod 2**64 see only the low bits of its factors).

Pure functions, blocking; no imports from the rest of the service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["ALGORITHM", "Chunk", "ChunkParams", "chunk_bytes", "chunk_file", "digest"]

ALGORITHM = "rk64-w48-v1"
WINDOW = 48
_P = 0x9E3779B97F4A7C15  # odd: invertible mod 2**64
_Q = pow(_P, -1, 1 << 64)
_BLOCK = 1 << 19  # bytes hashed per numpy pass: ~5 arrays of 8 bytes per byte, ~20 MiB at peak
DIGEST_BYTES = 16


def _gear() -> np.ndarray:
    words = [int.from_bytes(hashlib.sha256(b"edgeloader-cdc" + bytes([i])).digest()[:8], "little")
             for i in range(256)]
    return np.array(words, dtype=np.uint64)


_G = _gear()


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64, by doubling the known prefix (numpy wraps mod 2**64)."""
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    filled = 1
    while filled < n:
        take = min(filled, n - filled)
        out[filled:filled + take] = out[:take] * np.uint64(pow(base, filled, 1 << 64))
        filled += take
    return out


_PW = _powers(_P, _BLOCK + WINDOW)
_QW = _powers(_Q, _BLOCK + WINDOW)


@dataclass(frozen=True)
class ChunkParams:
    """Where cuts may fall: at least ``min_size`` apart, at most ``max_size``, on average about
    ``min_size + 2**bits`` bytes apart."""

    min_size: int = 16 * 1024
    bits: int = 15
    max_size: int = 256 * 1024
    algorithm: str = ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "min": self.min_size, "bits": self.bits, "max": self.max_size}

    @classmethod
    def from_json(cls, value: Any) -> ChunkParams:
        """Parameters read from a package's index; ValueError for anything this device cannot cut with."""
        if not isinstance(value, dict) or value.get("algorithm") != ALGORITHM:
            raise ValueError("unknown chunking algorithm")
        try:
            params = cls(int(value["min"]), int(value["bits"]), int(value["max"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError("bad chunking parameters") from None
        if not (WINDOW <= params.min_size <= params.max_size <= 16 << 20 and 8 <= params.bits <= 30):
            raise ValueError("chunking parameters out of range")
        return params


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    digest: str  # hex of the first DIGEST_BYTES of the chunk's SHA-256


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).digest()[:DIGEST_BYTES].hex()


def _candidates(block: np.ndarray, start: int, threshold: np.uint64) -> np.ndarray:
    """Positions p (bytes before a possible cut, i.e. cut after byte p-1) in a block whose first
    ``start`` bytes are only the window's history."""
    terms = _G[block] * _QW[: block.size]
    prefix = np.cumsum(terms, dtype=np.uint64)
    window = prefix.copy()
    window[WINDOW:] -= prefix[:-WINDOW]
    hashes = window * _PW[: block.size]
    hits = np.flatnonzero(hashes[start:] < threshold)
    return hits + start + 1


def _cut_points(read: Iterator[bytes], params: ChunkParams) -> list[int]:
    threshold = np.uint64((1 << 64) >> params.bits)
    candidates: list[np.ndarray] = []
    history = b""
    base = 0  # file offset of the block's first byte (its history before it)
    for data in read:
        block = np.frombuffer(history + data, dtype=np.uint8)
        candidates.append(_candidates(block, len(history), threshold) + (base - len(history)))
        base += len(data)
        history = (history + data)[-(WINDOW - 1):]
    found = np.concatenate(candidates) if candidates else np.empty(0, dtype=np.int64)
    size = base
    cuts: list[int] = []
    last = 0
    while size - last > params.min_size:
        i = int(np.searchsorted(found, last + params.min_size, side="left"))
        if i < found.size and found[i] < size and found[i] - last <= params.max_size:
            last = int(found[i])
        elif size - last > params.max_size:
            last += params.max_size
        else:
            break  # the rest, at most max_size, is the last chunk
        cuts.append(last)
    cuts.append(size)
    return cuts


def _blocks(f: BinaryIO) -> Iterator[bytes]:
    while data := f.read(_BLOCK):
        yield data


def chunk_file(path: Path, params: ChunkParams) -> list[Chunk]:
    """The chunks of a file: two passes (cut points, then digests), memory bounded by the block."""
    with path.open("rb") as f:
        cuts = _cut_points(_blocks(f), params)
        f.seek(0)
        out = []
        start = 0
        for end in cuts:
            if end > start:
                out.append(Chunk(start, end - start, digest(f.read(end - start))))
            start = end
    return out


def chunk_bytes(data: bytes, params: ChunkParams) -> list[Chunk]:
    view = memoryview(data)
    cuts = _cut_points((bytes(view[i:i + _BLOCK]) for i in range(0, len(data), _BLOCK)), params)
    out = []
    start = 0
    for end in cuts:
        if end > start:
            out.append(Chunk(start, end - start, digest(view[start:end])))
        start = end
    return out
