"""Typed ``handler_options``: what model.json may say to tune a model family.

Each family declares its options as a pydantic model (``Handler.options_model``) that forbids
unknown keys, so a typo (``min_scor``) or a wrong value (``"layout": "v9"``, ``"input_size": "320"``)
is refused with the field's name instead of being ignored. The models here are the shared parts;
each family adds its own fields in its module. No numpy, no runtime: model.json's JSON Schema is
generated from these.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

__all__ = ["HandlerOptions", "InputSize", "Number", "Score", "SizedOptions"]

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
