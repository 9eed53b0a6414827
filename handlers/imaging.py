"""Image decoding and the resize/letterbox/normalise steps every family shares.

Everything here runs on the request hot path: decoding reads the header first (size and format
checks cost nothing), JPEGs are decoded at reduced scale when the model wants a small input
(Pillow draft mode: the DCT does the downscaling), and tensors are written in place, in one
vectorised multiply(-add) from the resized pixels, with no intermediate arrays.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageDecodeError",
    "ImageTooLarge",
    "Letterbox",
    "PadPosition",
    "PixelScale",
    "UnsupportedImageType",
    "decode_image",
    "fit_size",
    "image_to_tensor",
    "letterbox_geometry",
    "sniff_format",
]

# Magic numbers of the formats we decode, and of common image formats we refuse by name.
_SUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
)
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees: the stored width and height are swapped.
_ROTATED = {5, 6, 7, 8}
# What ImageOps.exif_transpose does for each orientation, for pixels decoded without Pillow.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(ValueError):
    """The bytes are empty, truncated or not a decodable image."""


class ImageTooLarge(ValueError):
    """The image has more pixels than allowed (checked from the header, before decoding)."""


class UnsupportedImageType(ValueError):
    """A recognised image format that this service does not accept (GIF, TIFF, ...)."""


def sniff_format(data: bytes) -> str:
    """The image format by its magic number ("JPEG", "PNG", "BMP", "WEBP"); raises
    ImageDecodeError / UnsupportedImageType otherwise."""
    if not data:
        raise ImageDecodeError("empty image")
    return _sniff(data)


def _sniff(data: bytes) -> str:
    for magic, fmt in _SUPPORTED_MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _REFUSED_MAGIC:
        if data.startswith(magic):
            raise UnsupportedImageType(f"{fmt} images are not supported; send JPEG, PNG, BMP or WebP")
    if data[4:8] == b"ftyp":  # ISO media: HEIC/HEIF/AVIF
        raise UnsupportedImageType("HEIF/AVIF images are not supported; send JPEG, PNG, BMP or WebP")
    raise ImageDecodeError("not a JPEG, PNG, BMP or WebP image")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = as stored). A damaged EXIF block is ignored, not fatal: the pixels
    may be fine."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):
        return 1


def decode_image(
    data: bytes, target_size: tuple[int, int] | None, max_pixels: int, letterbox: bool = False
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode JPEG/PNG/BMP/WebP bytes to an RGB image.

    Returns ``(image, original_size)``: ``original_size`` is the full (width, height) of the
    picture after EXIF orientation; ``image`` may be smaller than that for JPEGs when
    ``target_size`` is given (decoded at a reduced scale, never below ``target_size``; with
    ``letterbox``, never below the part of it the picture will fill, keeping its aspect ratio).
    """
    if not data:
        raise ImageDecodeError("empty image")
    fmt = _sniff(data)
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=(fmt,))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height}, more than {max_pixels} pixels")
        orientation = _orientation(img)
        rotated = orientation in _ROTATED
        if target_size is not None and letterbox:
            target_size = fit_size((height, width) if rotated else (width, height), target_size)
        fast = _decode_jpeg_fast(data, img.mode, target_size, rotated, orientation) if fmt == "JPEG" else None
        if fast is not None:
            return fast, ((height, width) if rotated else (width, height))
        if target_size is not None and fmt == "JPEG":
            tw, th = target_size
            # draft() works on the stored (unrotated) raster.
            img.draft("RGB", (th, tw) if rotated else (tw, th))
        img.load()
        if orientation != 1:
            transposed = ImageOps.exif_transpose(img)
            if transposed is not None:
                img = transposed
        if img.mode == "P":
            # Palette images with transparency warn when converted straight to RGB.
            img = img.convert("RGBA")
        elif img.mode == "I" or img.mode.startswith("I;16"):
            # 16-bit greyscale (common from industrial cameras): Pillow would clip it at 255;
            # keep the top 8 bits instead.
            wide = np.asarray(img).astype(np.uint32) >> 8
            img = Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8), "L")
        if img.mode != "RGB":
            img = img.convert("RGB")
    except (ImageTooLarge, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in open() for absurd headers (and warns, which pytest turns
        # into an error, for merely large ones): same meaning as ours.
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError:
        # Pillow's message names the buffer object ("<_io.BytesIO object at 0x...>"): say it plainly.
        raise ImageDecodeError(f"cannot decode {fmt} image: the data is not a valid {fmt} file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode {fmt} image: {exc}") from exc
    original = (height, width) if rotated else (width, height)
    return img, original


def _decode_jpeg_fast(
    data: bytes, mode: str, target_size: tuple[int, int] | None, rotated: bool, orientation: int
) -> Image.Image | None:
    """A colour or grey JPEG's pixels through libjpeg-turbo's own API (simplejpeg), or None to let
    Pillow do it (CMYK, or anything libjpeg-turbo reports as damaged: Pillow words the error).

    Why: the same library Pillow uses, but it scales in the DCT by any M/8, not only 1/2, 1/4,
    1/8 (a 640x480 photo for a 300x300 model decodes at 400x300), and writes RGB straight into
    the array. Decode and resize for the SSD: 2.45 -> 1.67 ms (bench/sidebyside.py's photo);
    identical pixels at full scale."""
    if mode not in ("RGB", "L"):
        return None
    kwargs = {}
    if target_size is not None:
        tw, th = (target_size[1], target_size[0]) if rotated else target_size
        kwargs = {"min_width": tw, "min_height": th}
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", **kwargs)
    except ValueError:
        return None
    img = Image.fromarray(pixels, "RGB")
    return img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img


def fit_size(image_size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest (w, h) with the image's aspect ratio that fits in ``box``."""
    iw, ih = image_size
    bw, bh = box
    scale = min(bw / iw, bh / ih)
    return max(1, min(bw, round(iw * scale))), max(1, min(bh, round(ih * scale)))


@dataclass(frozen=True)
class Letterbox:
    """Where the image sits inside the model input: content size and (left, top) offset."""

    input_size: tuple[int, int]
    content_size: tuple[int, int]
    offset: tuple[int, int]

    def to_image(self, xyxy: np.ndarray) -> np.ndarray:
        """Boxes (N, 4) in input pixels -> boxes normalised to the image (not clipped)."""
        (cw, ch), (left, top) = self.content_size, self.offset
        out = np.asarray(xyxy, dtype=np.float32) - np.array([left, top, left, top], np.float32)
        out /= np.array([cw, ch, cw, ch], np.float32)
        return out


PadPosition = Literal["centre", "bottom-right"]


def letterbox_geometry(
    image_size: tuple[int, int], input_size: tuple[int, int], pad_position: PadPosition = "centre"
) -> Letterbox:
    """Letterbox of an image into the input, keeping aspect ratio: centred (the padding split on
    both sides, the odd pixel right and below, as Ultralytics does) or in the top-left corner
    (all the padding right and below)."""
    cw, ch = fit_size(image_size, input_size)
    iw, ih = input_size
    offset = ((iw - cw) // 2, (ih - ch) // 2) if pad_position == "centre" else (0, 0)
    return Letterbox(input_size, (cw, ch), offset)


Channels3 = tuple[float, float, float]


@dataclass(frozen=True)
class PixelScale:
    """Tensor value = pixel * ``scale`` + ``offset`` (float32), one number for every channel or one
    per channel (in the order of the tensor's channels)."""

    scale: float | Channels3
    offset: float | Channels3 = 0.0

    @classmethod
    def to_range(cls, low: float, high: float) -> PixelScale:
        """Map pixel values 0..255 linearly onto [low, high]."""
        return cls((high - low) / 255.0, low)

    @classmethod
    def mean_std(cls, mean: Channels3, std: Channels3) -> PixelScale:
        """(pixel - mean) / std per channel, mean and std in pixel units."""
        return cls((1 / std[0], 1 / std[1], 1 / std[2]), (-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]))

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, tuple) or isinstance(self.offset, tuple)

    def _column(self, value: float | Channels3, ndim: int, channel_axis: int) -> np.ndarray:
        shape = [1] * ndim
        shape[channel_axis] = 3
        return np.broadcast_to(np.asarray(value, np.float32), (3,)).reshape(shape)

    def apply(self, pixels: np.ndarray, out: np.ndarray, channel_axis: int = -1) -> None:
        if not isinstance(self.scale, tuple) and not isinstance(self.offset, tuple):
            # Written straight into the (strided) output: about 3x faster than a lookup-table gather
            # and no temporary array.
            np.multiply(pixels, np.float32(self.scale), out=out, dtype=np.float32)
            if self.offset:
                np.add(out, np.float32(self.offset), out=out)
            return
        np.multiply(pixels, self._column(self.scale, out.ndim, channel_axis), out=out, dtype=np.float32)
        np.add(out, self._column(self.offset, out.ndim, channel_axis), out=out)

    def value(self, pixel: int) -> float:
        """The tensor value of ``pixel`` (a scale with one number for every channel)."""
        if isinstance(self.scale, tuple) or isinstance(self.offset, tuple):
            raise ValueError("a per-channel scale has one value per channel: use values()")
        return float(np.float32(pixel) * np.float32(self.scale) + np.float32(self.offset))

    def values(self, pixel: int) -> np.ndarray:
        """The tensor value of ``pixel`` per channel, shape (3,)."""
        scale = np.broadcast_to(np.asarray(self.scale, np.float32), (3,))
        return np.float32(pixel) * scale + np.broadcast_to(np.asarray(self.offset, np.float32), (3,))


def image_to_tensor(
    image: Image.Image,
    input_size: tuple[int, int],
    *,
    scale: PixelScale | None,
    layout: Literal["NHWC", "NCHW"] = "NHWC",
    keep_aspect: bool = True,
    fill: int = 0,
    bgr: bool = False,
    pad_position: PadPosition = "centre",
) -> tuple[np.ndarray, Letterbox]:
    """Resize (bilinear) and pack an RGB image into a batch-of-one tensor.

    ``scale`` maps pixels to float32 tensor values; ``None`` keeps raw uint8 pixels. With
    ``keep_aspect`` the image is letterboxed (placed as ``pad_position`` says, padded with pixel
    value ``fill``); otherwise stretched to the input size. ``bgr`` reverses the channels. The
    returned ``Letterbox`` maps boxes in input pixels back to the image.
    """
    iw, ih = input_size
    geo = (
        letterbox_geometry(image.size, input_size, pad_position)
        if keep_aspect
        else Letterbox(input_size, input_size, (0, 0))
    )
    (cw, ch), (left, top) = geo.content_size, geo.offset
    # reducing_gap=3: big reductions start with a box-filter integer reduce (about 2x faster on a
    # non-JPEG photo, which draft mode cannot shrink); Pillow documents the result as almost
    # indistinguishable from a full bilinear pass.
    resized = (
        image if image.size == (cw, ch) else image.resize((cw, ch), Image.Resampling.BILINEAR, reducing_gap=3.0)
    )
    pixels = np.asarray(resized)  # (ch, cw, 3) uint8, read-only view of Pillow's buffer
    if bgr:
        pixels = pixels[..., ::-1]  # a view: the copy into the tensor below does the reordering
    nhwc = layout == "NHWC"
    shape = (1, ih, iw, 3) if nhwc else (1, 3, ih, iw)
    out = np.empty(shape, dtype=np.uint8 if scale is None else np.float32)
    if (cw, ch) != (iw, ih):
        if scale is None:
            out.fill(fill)
        elif not scale.per_channel:
            out.fill(scale.value(fill))
        else:
            out[...] = scale.values(fill).reshape((1, 1, 1, 3) if nhwc else (1, 3, 1, 1))
    if nhwc:
        region = out[0, top : top + ch, left : left + cw, :]
        src = pixels
    else:
        region = out[0, :, top : top + ch, left : left + cw]
        src = pixels.transpose(2, 0, 1)
    if scale is None:
        region[...] = src
    else:
        scale.apply(src, region, channel_axis=-1 if nhwc else 0)
    return out, geo
