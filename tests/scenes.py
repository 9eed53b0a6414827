"""Test images made from scikit-image's public-domain photos, the same pixels wherever they are made.

Shared by the conformance tests and scripts/vendor_golden.py (which runs in another virtual
environment, with MediaPipe): numpy and scikit-image only. Resampling is nearest-pixel by integer
arithmetic, so two numpy versions make the same bytes (the goldens record each scene's SHA-256).

Two kinds of scene per model input size S:
- "exact" scenes are S x S, S/2 x S or S x S/2 pixels: MediaPipe's ImageToTensorCalculator and our
  preprocessing then both copy the pixels as they are (letterboxed by whole pixels, no resampling),
  so the model sees the same tensor on both sides and any difference is in the decoding;
- "photo" scenes are the full-size photos: each side resamples in its own way (OpenCV's warp there,
  Pillow's antialiased resize here), so they agree only approximately.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from skimage import data

__all__ = ["EXACT_SCENES", "PHOTO_SCENES", "scene", "sha256"]


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3])


def _sample(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-pixel resampling by integer arithmetic (pixel centres)."""
    rows = ((2 * np.arange(height) + 1) * a.shape[0]) // (2 * height)
    cols = ((2 * np.arange(width) + 1) * a.shape[1]) // (2 * width)
    return np.ascontiguousarray(a[rows][:, cols])


def _astronaut() -> np.ndarray:
    return _rgb(data.astronaut())


def _two_astronauts() -> np.ndarray:
    a = _astronaut()
    return np.concatenate((a, a[:, ::-1]), axis=1)  # two faces side by side


# name -> (source photo, height factor, width factor) of the input size S.
_EXACT: dict[str, tuple[Callable[[], np.ndarray], float, float]] = {
    "astronaut": (_astronaut, 1.0, 1.0),
    "astronaut-tall": (lambda: _astronaut()[:, 64:320], 1.0, 0.5),  # letterboxed left and right
    "two-astronauts": (_two_astronauts, 0.5, 1.0),  # letterboxed top and bottom, two faces
    "camera": (lambda: _rgb(data.camera()), 1.0, 1.0),
    "coffee": (lambda: _rgb(data.coffee()), 1.0, 1.0),  # nobody
}

_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _astronaut,
    "camera": lambda: _rgb(data.camera()),
    # Padded, so that the letterbox is not whole pixels (MediaPipe pads by fractions of a pixel).
    "astronaut-wide": lambda: np.pad(_astronaut(), ((0, 0), (100, 60), (0, 0))),
    "astronaut-tall": lambda: np.pad(_astronaut(), ((50, 200), (0, 0), (0, 0))),
    "two-astronauts": _two_astronauts,
}

EXACT_SCENES = tuple(_EXACT)
PHOTO_SCENES = tuple(_PHOTOS)


def scene(kind: str, name: str, size: int) -> np.ndarray:
    """The RGB uint8 pixels of a scene for a model of input size ``size`` x ``size``."""
    if kind == "photo":
        return _PHOTOS[name]()
    source, fh, fw = _EXACT[name]
    return _sample(source(), int(size * fh), int(size * fw))


def sha256(pixels: np.ndarray) -> str:
    h = hashlib.sha256(f"{pixels.shape}".encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return h.hexdigest()
