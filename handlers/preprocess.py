"""From ``handler_options`` to the input tensor: the preprocessing choices every family shares.

A family states what its models were trained with (scaling, letterbox or stretch, pad value, layout
default); ``PreprocessOptions`` may override each, the same way in every family: ``pixel_format``,
``layout``, ``mean``/``std``, ``pad_value`` and, where the family maps boxes back itself, ``resize``
and ``pad_position``. ``Preprocess`` is the result, fixed at load time: per request it is one call
of ``image_to_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from handlers.base import HandlerMismatch, TensorSpec
from handlers.imaging import Letterbox, PadPosition, PixelScale, image_to_tensor
from handlers.metadata import ModelMetadata
from handlers.options import PreprocessOptions, ResizeOptions, SizedOptions

__all__ = ["Layout", "PlannedInput", "Preprocess", "image_dims", "input_layout", "input_size", "preprocess_plan"]

Layout = Literal["NHWC", "NCHW"]


def input_layout(spec: TensorSpec, given: str | None, default: Layout) -> Layout:
    """The layout of a rank-4 image input: read from its shape (3 channels on axis 1 or 3), else
    ``given`` (the ``layout`` option), else the family's ``default``. An option that contradicts
    the shape is refused: the tensor could not be fed."""
    c1, c3 = spec.shape[1] == 3, spec.shape[3] == 3
    seen: Layout | None = "NCHW" if c1 and not c3 else "NHWC" if c3 and not c1 else None
    if given is None:
        return seen or default
    want: Layout = "NCHW" if given == "nchw" else "NHWC"
    if seen is not None and want != seen:
        raise HandlerMismatch(
            f"handler_options.layout is {given!r} but the model input {spec.name}{list(spec.shape)} is "
            f"{seen.lower()}"
        )
    return want


def image_dims(spec: TensorSpec, layout: Layout) -> tuple[int | None, int | None]:
    """(width, height) of an image input as its shape says (None where dynamic)."""
    return (spec.shape[3], spec.shape[2]) if layout == "NCHW" else (spec.shape[2], spec.shape[1])


def input_size(
    options: SizedOptions, spec: TensorSpec, layout: Layout, metadata: ModelMetadata, default: tuple[int, int]
) -> tuple[int, int]:
    """The (width, height) to feed: the ``input_size`` option, else the input's static size, else the
    size the model was exported for (its metadata's ``imgsz``), else the family's default. A size
    that is no multiple of the stride the metadata states is refused (the model would fail on it)."""
    w, h = image_dims(spec, layout)
    size = options.input_size or ((w, h) if w and h else metadata.imgsz or default)
    stride = metadata.stride
    if stride and (size[0] % stride or size[1] % stride) and not (w and h):
        raise HandlerMismatch(
            f"input size {size[0]}x{size[1]} is not a multiple of the model's stride {stride}; "
            "set handler_options.input_size to one that is"
        )
    return size


@dataclass(frozen=True)
class Preprocess:
    """Image -> input tensor, as decided at load time."""

    size: tuple[int, int]
    layout: Layout
    scale: PixelScale | None  # None: raw uint8 pixels
    bgr: bool = False
    keep_aspect: bool = True
    fill: int = 0
    pad_position: PadPosition = "centre"

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Letterbox]:
        return image_to_tensor(image, self.size, scale=self.scale, layout=self.layout, keep_aspect=self.keep_aspect,
                               fill=self.fill, bgr=self.bgr, pad_position=self.pad_position)


def preprocess_plan(
    options: PreprocessOptions,
    spec: TensorSpec,
    size: tuple[int, int],
    layout: Layout,
    *,
    scale: PixelScale | None,
    resize: Literal["letterbox", "stretch"],
    fill: int,
) -> Preprocess:
    """The family's own preprocessing (``scale``, ``resize``, ``fill``) with the options applied."""
    if options.mean is not None or options.std is not None:
        if scale is None:
            raise HandlerMismatch(
                f"handler_options.mean/std apply to float inputs; this model takes {spec.dtype} pixels "
                "(its quantization maps them itself)"
            )
        scale = PixelScale.mean_std(options.mean or (0.0, 0.0, 0.0), options.std or (1.0, 1.0, 1.0))
    pad_position: PadPosition = "centre"
    if isinstance(options, ResizeOptions):
        resize = options.resize or resize
        pad_position = "bottom-right" if options.pad_position == "bottom-right" else "centre"
    return Preprocess(
        size=size,
        layout=layout,
        scale=scale,
        bgr=options.pixel_format == "bgr",
        keep_aspect=resize == "letterbox",
        fill=fill if options.pad_value is None else options.pad_value,
        pad_position=pad_position,
    )


class PlannedInput:
    """Mixin for a family whose input is made by one ``Preprocess`` plan (``self._prep``, set at load
    time): the input size and the letterbox choice are the plan's."""

    _prep: Preprocess

    @property
    def input_size(self) -> tuple[int, int]:
        return self._prep.size

    @property
    def letterboxes(self) -> bool:
        return self._prep.keep_aspect
