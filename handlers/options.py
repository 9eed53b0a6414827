"""Typed ``handler_options``: what model.json may say to tune a model family.

Each family declares its options as a pydantic model (``Handler.options_model``) that forbids
unknown keys, so a typo (``min_scor``) or a wrong value (``"layout": "v9"``, ``"input_size": "320"``)
is refused with the field's name instead of being ignored. The models here are the shared parts;
each family adds its own fields in its module. No numpy, no runtime: model.json's JSON Schema is
generated from these.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

__all__ = [
    "Channels",
    "HandlerOptions",
    "InputSize",
    "Number",
    "PreprocessOptions",
    "ResizeOptions",
    "Score",
    "SizedOptions",
]

# A JSON number; text such as "0.5" is refused rather than read.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Score = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]


def _input_size(value: Any) -> tuple[int, int]:
    """320 means 320x320; [w, h] is width and height. Text is refused (not read digit by digit)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192

    if whole(value):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(whole(v) for v in value):
        return int(value[0]), int(value[1])
    raise PydanticCustomError("form", "a whole number of pixels or [width, height], e.g. 320 or [320, 240]")


InputSize = Annotated[
    tuple[int, int],
    PlainValidator(_input_size),
    WithJsonSchema({
        "anyOf": [
            {"type": "integer", "minimum": 1, "maximum": 8192},
            {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 8192},
             "minItems": 2, "maxItems": 2},
        ],
        "description": "Model input size for models whose input height/width are dynamic: "
                       "320 (square) or [width, height].",
    }),
]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _channels(value: Any, positive: bool) -> tuple[float, float, float]:
    """One number for every channel, or [c0, c1, c2] in the order of the model's channels."""
    if _number(value):
        value = [value] * 3
    if (isinstance(value, list | tuple) and len(value) == 3 and all(_number(v) for v in value)
            and (not positive or all(v > 0 for v in value))):
        return float(value[0]), float(value[1]), float(value[2])
    what, example = ("numbers above 0", "[58.4, 57.1, 57.4]") if positive else ("numbers", "[123.7, 116.3, 103.5]")
    raise PydanticCustomError("form", f"a number or three {what} (one per channel), e.g. {example}")


def _channel_schema(description: str, positive: bool) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0} if positive else {"type": "number"}
    return {
        "anyOf": [number, {"type": "array", "items": number, "minItems": 3, "maxItems": 3}],
        "description": description,
    }


Channels = Annotated[
    tuple[float, float, float],
    PlainValidator(lambda v: _channels(v, positive=False)),
    WithJsonSchema(_channel_schema("Per channel, in pixel units (0..255): subtracted before dividing by std.",
                                   positive=False)),
]
PositiveChannels = Annotated[
    tuple[float, float, float],
    PlainValidator(lambda v: _channels(v, positive=True)),
    WithJsonSchema(_channel_schema("Per channel, in pixel units (0..255): the divisor after subtracting mean.",
                                   positive=True)),
]


class HandlerOptions(BaseModel):
    """Options every family takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    # The form a field expects, for error messages where pydantic's own would read poorly.
    forms: ClassVar[dict[str, str]] = {}

    min_score: Score | None = None
    """Lowest score worth returning at all (requests can ask for more, never for less). Default: 0.05
    (BlazeFace: MediaPipe's own threshold, 0.5 short range, 0.6 full range)."""


class SizedOptions(HandlerOptions):
    """Options of the families that resize the image to an input size they can be told."""

    input_size: InputSize | None = None
    """Input size fed to a model whose input height/width are dynamic: 320 or [width, height]."""


class PreprocessOptions(SizedOptions):
    """How an image becomes the input tensor: options every family that takes them honours the same way.
    Left out, each family keeps the preprocessing its models were trained with."""

    pixel_format: Literal["rgb", "bgr"] | None = None
    """Channel order the model expects: "rgb" (default) or "bgr" (OpenCV-trained models)."""
    layout: Literal["nhwc", "nchw"] | None = None
    """Input tensor layout: "nhwc" or "nchw". Read from the input's shape; needed only when the shape
    does not tell (every dimension dynamic)."""
    mean: Channels | None = None
    """Per channel, in pixel units (0..255, after pixel_format): tensor = (pixel - mean) / std. With
    mean or std given they replace the family's own scaling; the one left out is 0 (mean) or 1 (std)."""
    std: PositiveChannels | None = None
    """Per channel, in pixel units (0..255): tensor = (pixel - mean) / std (std 255 and mean 0 give 0..1)."""
    pad_value: Annotated[int, Field(ge=0, le=255, strict=True)] | None = None
    """Pixel value (0..255, before mean/std) of the letterbox bands. Default: the family's (YOLO 114)."""


class ResizeOptions(PreprocessOptions):
    """Preprocessing options of the families that map boxes back to the image themselves."""

    resize: Literal["letterbox", "stretch"] | None = None
    """"letterbox" keeps the aspect ratio and pads; "stretch" scales each side to the input."""
    pad_position: Literal["centre", "center", "bottom-right"] | None = None
    """Where a letterboxed image sits: "centre" (the bands split on both sides, as Ultralytics does) or
    "bottom-right" (the image in the top-left corner, all the padding right and below)."""
