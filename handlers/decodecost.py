"""What decoding an image will cost in memory, read from its header alone (no decoder runs).

A 117 KB WebP of 7000x7000 pixels made Pillow allocate about 830 MB: libwebp's animation decoder
keeps RGBA canvases of its own beside Pillow's image and the RGB conversion. ``bench/hostile.py
--per-pixel`` measures the peak per decoded pixel (fresh process, 3000x3000): WebP 16, BMP 5
(palette), PNG 4 (RGB), JPEG about 6 at its draft size. The figures below round WebP up and leave
PNG and BMP room for RGBA and 16-bit images, which convert through a wider intermediate.

Parsing is a few struct reads at fixed offsets (JPEG: a walk over its segment headers), cheap
enough for the event loop, so that a request can wait for memory *before* a worker thread starts
to decode it.
"""

from __future__ import annotations

import struct

__all__ = ["BYTES_PER_PIXEL", "decode_cost", "image_dimensions"]

# Peak bytes per decoded pixel, by format (measured; see the module docstring).
BYTES_PER_PIXEL = {"JPEG": 8, "PNG": 10, "BMP": 10, "WEBP": 18}
# Every decode costs at least this much (buffers, Pillow objects, the resized copy).
_FLOOR = 1 << 20


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def image_dimensions(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the header says, or None when the header is not where it should be (the
    decoder then says what is wrong with the image)."""
    try:
        if fmt == "PNG" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if fmt == "BMP" and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if fmt == "WEBP":
            return _webp_size(data)
        if fmt == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_draft_scale(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The reduction Pillow's JPEG draft mode will pick (1, 2, 4 or 8), as JpegImageFile.draft does."""
    if target is None:
        return 1
    scale = min(size[0] // max(target[0], 1), size[1] // max(target[1], 1))
    # Either orientation of the target (EXIF rotation swaps it): take the smaller reduction.
    scale = min(scale, size[0] // max(target[1], 1), size[1] // max(target[0], 1))
    for factor in (8, 4, 2):
        if scale >= factor:
            return factor
    return 1


def decode_cost(data: bytes, fmt: str, target: tuple[int, int] | None) -> int:
    """Bytes of memory decoding ``data`` (of format ``fmt``) will need at its peak, estimated from
    the header. ``target``: the model's input size (JPEGs are decoded at reduced scale for it)."""
    size = image_dimensions(data, fmt)
    if size is None:
        return _FLOOR
    width, height = size
    if fmt == "JPEG":
        factor = _jpeg_draft_scale(size, target)
        width, height = -(-width // factor), -(-height // factor)
    return max(_FLOOR, width * height * BYTES_PER_PIXEL.get(fmt, 18))
