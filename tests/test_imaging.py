"""Image decoding limits and errors, draft decoding, and the letterbox/tensor helpers."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from handlers.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    Letterbox,
    PixelScale,
    UnsupportedImageType,
    decode_image,
    fit_size,
    image_to_tensor,
    letterbox_geometry,
)

MAX = 50_000_000


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """A smooth picture (compresses well, survives JPEG and downscaling recognisably)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack((x + 0 * y, y + 0 * x, (x + y) / 2), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds only a few bytes of pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(gradient(4000, 3000), "JPEG", quality=85)


def test_big_jpeg_is_draft_decoded_to_a_fraction(big_jpeg: bytes) -> None:
    image, original = decode_image(big_jpeg, (128, 128), MAX)
    assert original == (4000, 3000)
    assert image.size == (500, 375)  # 1/8 scale: the largest reduction that stays >= 128x128
    assert image.mode == "RGB"
    # Same picture, just smaller.
    reference = np.asarray(gradient(4000, 3000).resize(image.size, Image.Resampling.BILINEAR), np.float32)
    assert np.abs(np.asarray(image, np.float32) - reference).mean() < 4.0


@pytest.mark.parametrize("target", [(600, 600), (1000, 200), (3000, 3000), (4000, 3000)])
def test_draft_never_goes_below_the_target(big_jpeg: bytes, target: tuple[int, int]) -> None:
    image, original = decode_image(big_jpeg, target, MAX)
    assert original == (4000, 3000)
    w, h = image.size
    assert w >= min(target[0], 4000) and h >= min(target[1], 3000)
    assert w * 3 == h * 4  # aspect ratio kept


def test_without_target_the_full_image_is_decoded(big_jpeg: bytes) -> None:
    image, original = decode_image(big_jpeg, None, MAX)
    assert image.size == original == (4000, 3000)


def test_exif_orientation_is_applied_and_reported() -> None:
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:60, :60] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    image, original = decode_image(data, None, MAX)
    assert original == image.size == (300, 400)
    shown = np.asarray(image)
    assert shown[10, 290, 0] > 200 and shown[10, 290, 1] < 60  # now top-right
    assert shown[10, 10, 0] < 60
    # Draft decoding works on the stored raster but keeps the displayed orientation.
    small, original = decode_image(data, (64, 32), MAX)
    assert original == (300, 400)
    assert small.size[0] >= 64 and small.size[1] >= 32 and small.size[0] < small.size[1]


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("BMP", "RGB"), ("WEBP", "RGB"), ("JPEG", "L")]
)
def test_supported_formats_decode_to_rgb(fmt: str, mode: str) -> None:
    data = encode(gradient(120, 80).convert(mode), fmt)
    image, original = decode_image(data, None, MAX)
    assert image.mode == "RGB"
    assert image.size == original == (120, 80)


def test_16_bit_greyscale_png_keeps_its_contrast() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256), (16, 1)).astype(np.uint16)
    image, _ = decode_image(encode(Image.fromarray(ramp), "PNG"), None, MAX)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(pixels[0, :, 0], ramp[0] >> 8)  # not clipped at 255
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255


def test_palette_png_with_transparency_decodes_without_warnings() -> None:
    # pytest turns warnings into errors here; Pillow warns when such images go straight to RGB.
    data = encode(gradient(64, 64).convert("P"), "PNG", transparency=0)
    image, _ = decode_image(data, None, MAX)
    assert image.mode == "RGB"


def test_truncated_jpeg_is_a_decode_error(big_jpeg: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(big_jpeg[: len(big_jpeg) // 2], (128, 128), MAX)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # not "fixed" by a global switch


@pytest.mark.parametrize("data", [b"", b"hello, this is not an image" * 4, b"\xff\xd8\xff\xe0" + b"\0" * 20])
def test_empty_or_garbage_bytes_are_decode_errors(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data, None, MAX)


def test_huge_header_is_refused_before_any_pixel_is_allocated() -> None:
    data = png_header(100_000, 100_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode_image(data, None, MAX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_our_pixel_limit_applies_below_pillows() -> None:
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        decode_image(png_header(8000, 8000), None, 20_000_000)
    small, _ = decode_image(encode(gradient(100, 100), "PNG"), None, 10_000)
    assert small.size == (100, 100)  # exactly at the limit is fine


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedImageType, match=fmt):
        decode_image(encode(gradient(32, 32), fmt), None, MAX)


def test_error_types_are_value_errors() -> None:
    for cls in (ImageDecodeError, ImageTooLarge, UnsupportedImageType):
        assert issubclass(cls, ValueError)


# -- geometry and tensors ----------------------------------------------------------------------------


def test_fit_size_keeps_aspect_ratio() -> None:
    assert fit_size((640, 480), (320, 320)) == (320, 240)
    assert fit_size((300, 600), (320, 320)) == (160, 320)
    assert fit_size((10, 1000), (128, 128)) == (1, 128)


def test_letterbox_maps_the_content_area_onto_the_image() -> None:
    geo = letterbox_geometry((640, 480), (320, 320))
    assert geo == Letterbox((320, 320), (320, 240), (0, 40))
    corners = geo.to_image(np.array([[0, 40, 320, 280], [160, 160, 160, 160]], np.float32))
    np.testing.assert_allclose(corners, [[0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]])


def test_letterboxed_nchw_tensor_is_exact() -> None:
    image = gradient(640, 480)
    tensor, geo = image_to_tensor(image, (416, 416), scale=PixelScale.to_range(0, 1), layout="NCHW", fill=128)
    assert tensor.shape == (1, 3, 416, 416) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    assert geo.content_size == (416, 312) and geo.offset == (0, 52)
    expected = np.full((416, 416, 3), 128, np.uint8)
    expected[52:364] = np.asarray(image.resize((416, 312), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(tensor[0], expected.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_nhwc_range_and_zero_border() -> None:
    white = Image.new("RGB", (200, 100), (255, 255, 255))
    tensor, geo = image_to_tensor(white, (128, 128), scale=PixelScale.to_range(-1, 1), fill=0)
    assert geo.offset == (0, 32)
    np.testing.assert_allclose(tensor[0, 32:96], 1.0, atol=1e-6)  # content
    np.testing.assert_allclose(tensor[0, :32], -1.0)  # black border = pixel 0
    np.testing.assert_allclose(tensor[0, 96:], -1.0)


def test_stretch_to_raw_uint8() -> None:
    image = gradient(640, 480)
    tensor, geo = image_to_tensor(image, (300, 300), scale=None, keep_aspect=False)
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 300, 300, 3)
    assert geo == Letterbox((300, 300), (300, 300), (0, 0))
    np.testing.assert_array_equal(tensor[0], np.asarray(image.resize((300, 300), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_own_transpose(orientation: int) -> None:
    pixels = np.asarray(gradient(64, 48))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    image, original = decode_image(data, None, MAX)
    with Image.open(io.BytesIO(data)) as reference:
        expected = ImageOps.exif_transpose(reference.convert("RGB"))
    assert image.size == original == expected.size
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_jpegs_scale_in_eighths_not_only_halves() -> None:
    # Pillow's draft mode can only halve: a 640x480 photo for a 300x300 model stayed 640x480.
    # libjpeg-turbo scales by any M/8: 5/8 gives 400x300, the least work that keeps the target.
    data = encode(gradient(640, 480), "JPEG", quality=90)
    image, original = decode_image(data, (300, 300), MAX)
    assert original == (640, 480)
    assert image.size == (400, 300)
    reference = np.asarray(gradient(640, 480).resize((400, 300), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(np.asarray(image, np.float32) - reference).mean() < 4.0


def test_cmyk_jpeg_still_decodes() -> None:
    data = encode(gradient(64, 48).convert("CMYK"), "JPEG", quality=95)
    image, original = decode_image(data, (32, 32), MAX)
    assert image.mode == "RGB" and original == (64, 48)


def test_a_letterboxed_model_needs_only_the_fitted_size_decoded() -> None:
    # A 4:3 photo fills 416x312 of a 416x416 letterboxed input: 6/8 scale (480x360) is enough; a stretched
    # input needs all 416 rows too, so 7/8 (560x420).
    data = encode(gradient(640, 480), "JPEG", quality=90)
    fitted, original = decode_image(data, (416, 416), MAX, letterbox=True)
    stretched, _ = decode_image(data, (416, 416), MAX)
    assert original == (640, 480)
    assert fitted.size == (480, 360) and stretched.size == (560, 420)
    # Rotated by EXIF: the fit is taken on the picture as shown, the scale on the stored raster.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(gradient(640, 480), "JPEG", exif=exif.tobytes(), quality=90)
    shown, original = decode_image(rotated, (416, 416), MAX, letterbox=True)
    assert original == (480, 640) and shown.size == (360, 480)
