"""The self-indexing package: a plain zip whose big files can be fetched piece by piece.

``edgeloader pack`` writes every package as an ordinary zip (deflate, readable by any unzip and by
every release of this module), with two differences that cost about 0.2% in size:

- a big file (a model, an ONNX external-data sidecar) is cut into content-defined chunks
  (chunking.py) and each chunk is deflated on its own, ending on a byte boundary (a sync flush)
  with no reference to the chunk before it. The concatenation, closed by an empty final block,
  is one valid deflate stream, so the member unpacks as usual; but a chunk's bytes in the zip
  depend only on the chunk's own content, wherever it lies;
- a last member, ``INDEX_MEMBER``, lists each chunked file's chunks: length, where its deflated
  bytes lie in the zip, and a digest of both forms.

A device reads the zip's tail (central directory, then this index) with a Range request, finds the
chunks it holds in its stored versions (same content, same digest), deflates them again and checks
the result against the index, and fetches only the rest (twin/incremental.py). The whole package's
SHA-256 from the twin is checked at the end, as for any download.

Deflate output is the same for the same zlib and settings; a device whose zlib deflates a chunk
differently from the packer's sees the digest differ and fetches that chunk (costing bytes, never
correctness). Zip64 is not written: packages are far below 4 GiB (``max_package_bytes``).

Blocking, pure functions over files and bytes.
"""

from __future__ import annotations

import binascii
import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from supervisor.formats import CHUNK_INDEX_MEMBER
from supervisor.package.chunking import ChunkParams, chunk_file, digest

__all__ = [
    "CHUNKED_MIN_BYTES",
    "IndexedChunk",
    "IndexedMember",
    "PackageIndex",
    "TailLayout",
    "encode_chunk",
    "parse_index_record",
    "parse_tail",
    "write_package",
]

# Files at least this big are chunked (smaller ones are fetched whole anyway).
CHUNKED_MIN_BYTES = 256 * 1024
# What a device accepts from a package's index before refusing it (it came from the network).
MAX_INDEX_PACKED = 4 << 20
MAX_INDEX_BYTES = 16 << 20
MAX_CHUNKS = 200_000

# Each chunk: a fresh raw-deflate stream, RLE matches plus Huffman codes, ended by a sync flush.
# Measured on float32/float16 weights (docs/twin.md): as small as level 6 with full matching
# (0.927 vs 0.927 of the input on tiny-YOLOv3) and 3-4x faster, which the device pays again for
# every chunk it reuses; RLE still squeezes runs of zeros (pruned or padded tensors).
CODEC: dict[str, object] = {"method": "deflate", "level": 9, "mem_level": 9, "strategy": "rle"}
_LEVEL, _MEM_LEVEL = 9, 9
_DEFLATE_END = b"\x03\x00"  # an empty final block with fixed codes: the end of the stream

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, as `pack` always wrote: same files, same bytes
_UNIX_FILE = 0o100644 << 16
_MADE_BY = (3 << 8) | 20  # Unix, zip 2.0
_STORED, _DEFLATED, _LZMA = 0, 8, 14
# LZMA for a package meant to be downloaded whole (a full retrain): no chunks, ~8% smaller than
# deflate on float32 weights because the literal coder sees each byte's position in its 4-byte word
# (lp=2, as byte grouping does). Zip method 14, which zipfile (every release of the module) reads;
# Info-ZIP's unzip 6 does not. Props: lc=0, lp=2, pb=2, 8 MiB dictionary.
_LZMA_PROPS = bytes([(2 * 5 + 2) * 9 + 0]) + (8 << 20).to_bytes(4, "little")


def encode_chunk(raw: bytes | memoryview) -> bytes:
    """A chunk's bytes inside the zip member (see CODEC)."""
    c = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15, _MEM_LEVEL, zlib.Z_RLE)
    return c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH)


@dataclass(frozen=True)
class IndexedChunk:
    raw_length: int
    offset: int  # of its deflated bytes in the package
    length: int  # of its deflated bytes
    raw_digest: str
    digest: str  # of its deflated bytes


@dataclass(frozen=True)
class IndexedMember:
    name: str
    size: int
    chunks: tuple[IndexedChunk, ...]


@dataclass(frozen=True)
class PackageIndex:
    params: ChunkParams
    members: tuple[IndexedMember, ...]

    def chunks(self) -> Iterable[IndexedChunk]:
        for member in self.members:
            yield from member.chunks

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "chunking": self.params.to_json(),
            "codec": CODEC,
            "members": [{
                "name": m.name, "size": m.size,
                "offset": m.chunks[0].offset if m.chunks else 0,
                "chunks": [[c.raw_length, c.length, c.raw_digest, c.digest] for c in m.chunks],
            } for m in self.members],
        }

    @classmethod
    def from_json(cls, doc: Any, package_size: int) -> PackageIndex:
        """Read and check an index from the network: ValueError when it is not one this device
        can use (the caller then downloads the package whole)."""
        if not isinstance(doc, dict) or doc.get("format") != 1 or doc.get("codec") != CODEC:
            raise ValueError("unknown index format or codec")
        params = ChunkParams.from_json(doc.get("chunking"))
        members = []
        count = 0
        end_of_last = 0
        for m in doc.get("members") or []:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("chunks"), list):
                raise ValueError("bad index member")
            offset, size = m.get("offset"), m.get("size")
            if not isinstance(offset, int) or not isinstance(size, int) or offset < end_of_last:
                raise ValueError("bad index member offset")
            chunks = []
            raw_total = 0
            for entry in m["chunks"]:
                count += 1
                if count > MAX_CHUNKS:
                    raise ValueError("too many chunks")
                raw_length, length, raw_digest, packed_digest = _chunk_entry(entry)
                if raw_length > params.max_size:
                    raise ValueError("chunk larger than the chunking allows")
                chunks.append(IndexedChunk(raw_length, offset, length, raw_digest, packed_digest))
                offset += length
                raw_total += raw_length
            if offset > package_size or raw_total != size:
                raise ValueError("index does not fit the package")
            end_of_last = offset
            members.append(IndexedMember(m["name"], size, tuple(chunks)))
        return cls(params, tuple(members))


def _chunk_entry(entry: Any) -> tuple[int, int, str, str]:
    if (
        isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, int) and x > 0 for x in entry[:2])
        and all(isinstance(x, str) and len(x) == 32 for x in entry[2:])
    ):
        return entry[0], entry[1], entry[2], entry[3]
    raise ValueError("bad chunk entry")


# -- writing -------------------------------------------------------------------------------------------


@dataclass
class _Written:
    name: bytes
    method: int
    crc: int
    packed: int
    size: int
    offset: int


def _local_header(w: _Written, flags: int = 0) -> bytes:
    return _LOCAL.pack(_LOCAL_SIG, _needs(w), _flags(w.name) | flags, w.method, 0, _DOS_DATE, w.crc, w.packed,
                       w.size, len(w.name), 0) + w.name


def _needs(w: _Written) -> int:
    return 63 if w.method == _LZMA else 20  # the "version needed" zip readers check


def _flags(name: bytes) -> int:
    return 0 if name.isascii() else 0x0800  # bit 11: the name is UTF-8


def _write_small(out: BinaryIO, name: str, data: bytes) -> _Written:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = c.compress(data) + c.flush()
    method = _DEFLATED
    if len(packed) >= len(data):
        packed, method = data, _STORED
    w = _Written(name.encode(), method, binascii.crc32(data), len(packed), len(data), out.tell())
    out.write(_local_header(w))
    out.write(packed)
    return w


def _write_lzma(out: BinaryIO, name: str, path: Path) -> _Written:
    import lzma

    w = _Written(name.encode(), _LZMA, 0, 0, 0, out.tell())
    out.write(_local_header(w, flags=0x02))
    start = out.tell()
    out.write(bytes([9, 20]) + len(_LZMA_PROPS).to_bytes(2, "little") + _LZMA_PROPS)
    comp = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA1, "lc": 0, "lp": 2, "pb": 2, "dict_size": 8 << 20, "preset": 6}])
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            w.crc = binascii.crc32(block, w.crc)
            w.size += len(block)
            out.write(comp.compress(block))
    out.write(comp.flush())
    end = out.tell()
    w.packed = end - start
    out.seek(w.offset)
    out.write(_local_header(w, flags=0x02))
    out.seek(end)
    return w


def _write_chunked(out: BinaryIO, name: str, path: Path, params: ChunkParams) -> tuple[_Written, IndexedMember]:
    w = _Written(name.encode(), _DEFLATED, 0, 0, 0, out.tell())
    out.write(_local_header(w))  # sizes and CRC unknown yet: written again below
    chunks = []
    with path.open("rb") as f:
        for chunk in chunk_file(path, params):
            f.seek(chunk.offset)
            raw = f.read(chunk.length)
            packed = encode_chunk(raw)
            chunks.append(IndexedChunk(len(raw), out.tell(), len(packed), chunk.digest, digest(packed)))
            out.write(packed)
            w.crc = binascii.crc32(raw, w.crc)
            w.size += len(raw)
    out.write(_DEFLATE_END)
    end = out.tell()
    w.packed = end - w.offset - _LOCAL.size - len(w.name)
    out.seek(w.offset)
    out.write(_local_header(w))
    out.seek(end)
    return w, IndexedMember(name, w.size, tuple(chunks))


def write_package(
    out: BinaryIO,
    entries: list[tuple[str, bytes | Path]],
    params: ChunkParams | None = None,
    *,
    chunk_min: int = CHUNKED_MIN_BYTES,
    compression: str = "chunked",
) -> PackageIndex | None:
    """Write a zip of ``entries`` (name, bytes or a file) in this order to the seekable ``out``; files
    of ``chunk_min`` bytes or more are chunked and listed in a last member, ``INDEX_MEMBER``
    (``compression="chunked"``), or LZMA-compressed whole (``"lzma"``: smallest for a device that
    reuses nothing, no index). Returns the index (None when nothing was chunked)."""
    params = params or ChunkParams()
    written: list[_Written] = []
    members: list[IndexedMember] = []
    for name, source in entries:
        if isinstance(source, Path) and source.stat().st_size >= chunk_min and compression == "lzma":
            written.append(_write_lzma(out, name, source))
        elif isinstance(source, Path) and source.stat().st_size >= chunk_min:
            w, member = _write_chunked(out, name, source, params)
            written.append(w)
            members.append(member)
        else:
            data = source.read_bytes() if isinstance(source, Path) else source
            written.append(_write_small(out, name, data))
    index = PackageIndex(params, tuple(members)) if members else None
    if index is not None:
        doc = json.dumps(index.to_json(), separators=(",", ":")).encode()
        written.append(_write_small(out, CHUNK_INDEX_MEMBER, doc))
    cd_offset = out.tell()
    for w in written:
        flags = _flags(w.name) | (0x02 if w.method == _LZMA else 0)
        out.write(_CENTRAL.pack(_CENTRAL_SIG, _MADE_BY, _needs(w), flags, w.method, 0, _DOS_DATE, w.crc,
                                w.packed, w.size, len(w.name), 0, 0, 0, 0, _UNIX_FILE, w.offset) + w.name)
    cd_size = out.tell() - cd_offset
    if cd_offset + cd_size >= 1 << 32 or len(written) >= 1 << 16:
        raise ValueError("package too large for a zip without zip64")
    out.write(_EOCD.pack(_EOCD_SIG, 0, 0, len(written), len(written), cd_size, cd_offset, 0))
    return index


# -- reading the tail (device side) -------------------------------------------------------------------


@dataclass(frozen=True)
class TailLayout:
    """Where a package's index lies: ``record`` is the byte range [start, end) of its local header and
    deflated data; ``directory`` the central directory's [start, end). None fields: no index."""

    record: tuple[int, int] | None
    directory: tuple[int, int]


def parse_tail(tail: bytes, tail_start: int, total: int) -> TailLayout:
    """From the last bytes of a package (``tail`` = bytes [tail_start, total)): where its central
    directory and its index are. ValueError when this is no zip this module wrote, or its central
    directory does not lie within ``tail`` (it is small: the caller reads enough)."""
    at = tail.rfind(struct.pack("<I", _EOCD_SIG))
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ValueError("no end of central directory in the tail")
    _, disk, cd_disk, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if disk or cd_disk or cd_offset == 0xFFFFFFFF or cd_offset + cd_size != tail_start + at:
        raise ValueError("not a plain single-disk zip")
    if cd_offset < tail_start:
        raise ValueError("central directory beyond the tail read")
    pos = cd_offset - tail_start
    record = None
    for _ in range(entries):
        fields = _CENTRAL.unpack_from(tail, pos)
        if fields[0] != _CENTRAL_SIG:
            raise ValueError("bad central directory entry")
        method, packed, name_len, extra_len, comment_len, local = fields[4], fields[8], fields[10], fields[11], \
            fields[12], fields[16]
        name = tail[pos + _CENTRAL.size: pos + _CENTRAL.size + name_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if name == CHUNK_INDEX_MEMBER.encode():
            if method != _DEFLATED or packed > MAX_INDEX_PACKED:
                raise ValueError("index member too large or not deflated")
            # The local header repeats the name and (as written by pack) has no extra field.
            end = local + _LOCAL.size + name_len + packed
            if end > cd_offset:
                raise ValueError("index member overlaps the central directory")
            record = (local, end)
    return TailLayout(record, (cd_offset, cd_offset + cd_size))


def parse_index_record(record: bytes, package_size: int) -> PackageIndex:
    """The index from its local record (header + deflated JSON). ValueError when unusable."""
    fields = _LOCAL.unpack_from(record, 0)
    if fields[0] != _LOCAL_SIG or fields[3] != _DEFLATED:
        raise ValueError("bad index local header")
    name_len, extra_len, packed = fields[9], fields[10], fields[7]
    data = record[_LOCAL.size + name_len + extra_len:][:packed]
    d = zlib.decompressobj(-15)
    raw = d.decompress(data, MAX_INDEX_BYTES)
    if d.unconsumed_tail or binascii.crc32(raw) != fields[6]:
        raise ValueError("index member too large or corrupt")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ValueError("index is not JSON") from None
    return PackageIndex.from_json(doc, package_size)
