"""MediaPipe's SSD anchors, computed from its options as SsdAnchorsCalculator computes them.

A port of mediapipe/calculators/tflite/ssd_anchors_calculator.cc (the single-scale path every
MediaPipe detector graph uses; ``multiscale_anchor_generation`` is not supported). The options keep
MediaPipe's names, so a graph's ``SsdAnchorsCalculatorOptions`` block can be copied into
``handler_options.anchors`` of model.json as it is.

Order matters as much as values: the model's i-th output row belongs to the i-th anchor. Layers
with the same stride share one feature map, and their anchors are interleaved per cell (cell by
cell, row-major; within a cell, the layers' aspect ratios in order, each followed by the
interpolated one).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SsdAnchorOptions", "ssd_anchors"]

_Positive = Annotated[float, Field(gt=0.0, strict=True, allow_inf_nan=False)]
_Whole = Annotated[int, Field(ge=1, le=8192, strict=True)]


class SsdAnchorOptions(BaseModel):
    """MediaPipe's SsdAnchorsCalculatorOptions (the same names and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    num_layers: _Whole | None = None
    """Number of output layers; default: as many as ``strides``."""
    min_scale: _Positive
    """Anchor scale of the first layer (a fraction of the input size)."""
    max_scale: _Positive
    """Anchor scale of the last layer."""
    input_size_width: _Whole | None = None
    """Input width the anchors are laid over; default: the model's input width."""
    input_size_height: _Whole | None = None
    """Input height the anchors are laid over; default: the model's input height."""
    anchor_offset_x: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.5
    """Anchor centre within its cell, horizontally (0.5: the middle)."""
    anchor_offset_y: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.5
    """Anchor centre within its cell, vertically."""
    strides: Annotated[tuple[_Whole, ...], Field(min_length=1)]
    """Stride of each layer in input pixels; layers with equal strides share a feature map."""
    feature_map_width: tuple[_Whole, ...] = ()
    """Feature map width of each layer, when it is not ceil(input width / stride)."""
    feature_map_height: tuple[_Whole, ...] = ()
    """Feature map height of each layer, when it is not ceil(input height / stride)."""
    aspect_ratios: tuple[_Positive, ...] = (1.0,)
    """Aspect ratios (width / height) of the anchors of every layer."""
    reduce_boxes_in_lowest_layer: bool = False
    """The first layer gets three predefined anchors (scale 0.1 at 1.0, and 2.0 and 0.5)."""
    interpolated_scale_aspect_ratio: Annotated[float, Field(ge=0.0, strict=True)] = 1.0
    """Aspect ratio of one extra anchor per layer at the geometric mean of this and the next layer's
    scale; 0 for none."""
    fixed_anchor_size: bool = False
    """Every anchor is 1 x 1 (the model predicts sizes directly, as BlazeFace and BlazePalm do)."""

    @model_validator(mode="after")
    def _consistent(self) -> SsdAnchorOptions:
        layers = self.num_layers or len(self.strides)
        if len(self.strides) != layers:
            raise ValueError(f"strides has {len(self.strides)} entries but num_layers is {layers}")
        for name in ("feature_map_width", "feature_map_height"):
            given = getattr(self, name)
            if given and len(given) != layers:
                raise ValueError(f"{name} has {len(given)} entries, one per layer ({layers}) is needed")
        if bool(self.feature_map_width) != bool(self.feature_map_height):
            raise ValueError("feature_map_width and feature_map_height go together")
        return self


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1.0)


@lru_cache(maxsize=32)
def ssd_anchors(options: SsdAnchorOptions, input_size: tuple[int, int]) -> np.ndarray:
    """Anchors (x_center, y_center, width, height), normalised to the input, shape (N, 4),
    float32, read-only. ``input_size`` (width, height) applies where the options give none."""
    width = options.input_size_width or input_size[0]
    height = options.input_size_height or input_size[1]
    strides = options.strides
    count = len(strides)
    parts: list[np.ndarray] = []
    layer = 0
    while layer < count:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < count and strides[last] == strides[layer]:
            scale = _scale(options.min_scale, options.max_scale, last, count)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for ratio in options.aspect_ratios:
                    ratios.append(ratio)
                    scales.append(scale)
                if options.interpolated_scale_aspect_ratio > 0.0:
                    following = 1.0 if last == count - 1 else _scale(
                        options.min_scale, options.max_scale, last + 1, count)
                    scales.append(math.sqrt(scale * following))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        if options.feature_map_width:
            fm_w, fm_h = options.feature_map_width[layer], options.feature_map_height[layer]
        else:
            fm_w, fm_h = math.ceil(width / strides[layer]), math.ceil(height / strides[layer])
        per_cell = len(ratios)
        if options.fixed_anchor_size:
            sizes = np.ones((per_cell, 2))
        else:
            root = np.sqrt(np.asarray(ratios))
            sizes = np.stack((np.asarray(scales) * root, np.asarray(scales) / root), axis=1)  # (w, h)
        ys, xs = np.meshgrid(np.arange(fm_h), np.arange(fm_w), indexing="ij")
        centers = np.stack(((xs.ravel() + options.anchor_offset_x) / fm_w,
                            (ys.ravel() + options.anchor_offset_y) / fm_h), axis=1)
        grid = np.concatenate(
            (np.repeat(centers, per_cell, axis=0), np.tile(sizes, (len(centers), 1))), axis=1
        )
        parts.append(grid)
        layer = last
    anchors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 4), np.float32)
    anchors.flags.writeable = False
    return anchors
