"""The handler interface: one model family's pre- and post-processing.

A handler knows nothing about HTTP, disks or IoT Hub. Given an image it produces the input
tensors; given the runtime's raw outputs it produces detections in coordinates normalised to
the *original* image (0..1, clipped). The engine adds labels and pixel boxes.

Handlers are registered in an explicit registry (``REGISTRY``) and chosen either by name
(manifest ``handler``) or by matching the model's input/output signature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import ValidationError

from handlers.metadata import ModelMetadata, parse_metadata
from handlers.options import HandlerOptions

__all__ = [
    "REGISTRY",
    "Detection",
    "Handler",
    "HandlerMismatch",
    "OptionsRejected",
    "Prepared",
    "Signature",
    "TensorSpec",
    "choose_handler",
    "lookup",
    "model_metadata",
    "register",
]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model as the runtime reports it."""

    name: str
    shape: tuple[int | None, ...]  # None (or a symbolic dim) for a dynamic dimension
    dtype: str  # numpy dtype name: "float32", "uint8", "int32", ...

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Signature:
    """A model's interface: what the handler registry matches on."""

    format: str  # "onnx" or "tflite"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Extra runtime facts a handler may need (e.g. TFLite quantization per input name:
    # {"quantization": {"input": (scale, zero_point)}}; ONNX metadata_props: {"metadata": {key: value}}).
    extra: Mapping[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


@dataclass(frozen=True)
class Detection:
    """One detection, box normalised to the original image: (xmin, ymin, xmax, ymax) in 0..1;
    keypoints (x, y) normalised the same way but not clipped (they may lie outside the image)."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]
    keypoints: tuple[tuple[float, float], ...] = ()


@dataclass
class Prepared:
    """What preprocess hands to the runtime, plus what postprocess needs to undo it."""

    feeds: dict[str, np.ndarray]
    image_size: tuple[int, int]  # original (width, height)
    meta: dict[str, Any] = field(default_factory=dict)


def model_metadata(signature: Signature) -> ModelMetadata:
    """What the model file says about itself (names, export size, task), typed."""
    props = signature.extra.get("metadata")
    return parse_metadata(props) if isinstance(props, Mapping) else ModelMetadata()


class HandlerMismatch(Exception):
    """No handler fits a model's signature (or the named one does not)."""


class OptionsRejected(HandlerMismatch):
    """The family that fits takes no such ``handler_options`` (a typo, a wrong type)."""

    def __init__(self, handler: str, model: type[HandlerOptions], error: ValidationError) -> None:
        super().__init__(f"handler_options of {handler}: {error}")
        self.handler, self.model, self.error = handler, model, error


class Handler(ABC):
    """Base class of a model family.

    Subclasses set ``name`` and implement ``matches``, ``preprocess`` and ``postprocess``.
    One instance serves one loaded model and is shared by all worker threads: keep
    per-request state in ``Prepared.meta``, never on ``self``.
    """

    name: ClassVar[str]
    # A short human description, shown in /models.
    description: ClassVar[str] = ""
    # What model.json's handler_options may say to this family (unknown keys are refused).
    options_model: ClassVar[type[HandlerOptions]] = HandlerOptions
    # The tasks a model's metadata may name for this family to run it (Ultralytics: detect, segment,
    # classify, pose, obb). A model whose metadata names none of any family's is refused by name.
    tasks: ClassVar[frozenset[str]] = frozenset({"detect"})
    # Other names model.json may give this family by (former names, kept for installed packages).
    aliases: ClassVar[tuple[str, ...]] = ()
    # What the family answers: "detect" (postprocess: detections) or "classify" (see classifier.py).
    task: ClassVar[str] = "detect"

    def __init__(self, signature: Signature, options: Mapping[str, Any] | HandlerOptions | None = None) -> None:
        """Raises pydantic's ValidationError when ``options`` do not fit ``options_model``, and
        HandlerMismatch when they do not fit the model."""
        self.signature = signature
        self.options = self.parse_options(options)
        self.metadata = model_metadata(signature)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | HandlerOptions | None) -> HandlerOptions:
        if isinstance(options, cls.options_model):
            return options
        if isinstance(options, HandlerOptions):
            options = options.model_dump(exclude_unset=True)
        return cls.options_model.model_validate(dict(options or {}))

    @classmethod
    @abstractmethod
    def matches(cls, signature: Signature) -> bool:
        """True when this family can run a model with this signature."""

    @classmethod
    def accepts(cls, signature: Signature, options: HandlerOptions) -> bool:
        """True when this family, *named* in model.json with these options, can run the model. A
        family may take more here than it claims by signature alone (a model whose decoding the
        options describe)."""
        return cls.matches(signature)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the model wants; the image decoder may decode JPEGs at reduced size
        down to this (Pillow draft mode) because the image is resized to it anyway."""
        raise NotImplementedError

    @property
    def letterboxes(self) -> bool:
        """True when the image is fitted into the input keeping its aspect ratio: then a JPEG only has
        to be decoded down to the fitted size (416x312 of a 4:3 photo for 416x416), not to the whole
        input. False (the safe answer) when it is stretched to the input."""
        return False

    @property
    def num_classes(self) -> int | None:
        """How many classes the outputs can name (to check the labels file); None if unknown."""
        return None

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Class names the model file carries (its metadata); None when it carries none. A labels
        file in the package beats them."""
        return self.metadata.names

    def fit_labels(self, labels: Sequence[str]) -> list[str]:
        """The labels file's names, aligned with the model's class ids (called once, at load time).
        Raises ValueError (the reason, one line) when they cannot be."""
        return list(labels)

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Prepared:
        """RGB PIL image (already decoded, maybe draft-reduced) -> runtime feeds.

        ``Prepared.image_size`` must be the size of the image as given; the engine rescales
        normalised boxes to the original pixels itself."""

    @abstractmethod
    def postprocess(self, outputs: Mapping[str, np.ndarray], prepared: Prepared) -> list[Detection]:
        """Runtime outputs by name -> detections, normalised to the image, best first.

        Return every detection above ``self.min_score``; the engine applies the request
        threshold, label filter and max count."""

    @property
    def min_score(self) -> float:
        """Lowest score worth returning (requests can ask for more, never for less)."""
        return 0.05 if self.options.min_score is None else self.options.min_score


REGISTRY: dict[str, type[Handler]] = {}
# Former names of families -> the family (model.json may still say them).
ALIASES: dict[str, type[Handler]] = {}


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator adding a handler to the registry under its ``name`` (and its aliases)."""
    for name in (cls.name, *cls.aliases):
        if name in REGISTRY or name in ALIASES:
            raise ValueError(f"handler {name!r} registered twice")
    REGISTRY[cls.name] = cls
    ALIASES.update(dict.fromkeys(cls.aliases, cls))
    return cls


def lookup(name: str) -> type[Handler] | None:
    """The family named ``name`` (or by a former name of it), if any."""
    import handlers  # noqa: F401  (importing the package registers every family)

    return REGISTRY.get(name) or ALIASES.get(name)


def describe(signature: Signature) -> str:
    def fmt(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in specs)

    return f"{signature.format} inputs [{fmt(signature.inputs)}] outputs [{fmt(signature.outputs)}]"


def choose_handler(
    signature: Signature, name: str | None = None, options: Mapping[str, Any] | HandlerOptions | None = None
) -> Handler:
    """The handler for a model: the named one (checked), else the single family that matches."""
    import handlers  # noqa: F401  (importing the package registers every family)

    task = model_metadata(signature).task
    if task is not None and not any(task in cls.tasks for cls in REGISTRY.values()):
        raise HandlerMismatch(_task_refusal(task))
    if name:
        cls = lookup(name)
        if cls is None:
            raise HandlerMismatch(f"unknown handler {name!r}; known: {', '.join(sorted(REGISTRY))}")
        if task is not None and task not in cls.tasks:
            raise HandlerMismatch(f"handler {name!r} does not run {task!r} models (the task in the model's metadata)")
        try:
            parsed = cls.parse_options(options)
        except ValidationError as exc:
            raise OptionsRejected(cls.name, cls.options_model, exc) from None
        if not cls.accepts(signature, parsed):
            raise HandlerMismatch(f"handler {name!r} does not fit the model: {describe(signature)}")
        return _make(cls, signature, parsed)
    fits = [cls for cls in REGISTRY.values() if (task is None or task in cls.tasks) and cls.matches(signature)]
    if not fits:
        # The action first: a reason shown in the twin is cut at ~200 characters, the signature may be long.
        raise HandlerMismatch(
            f"no handler matches the model; set 'handler' in model.json to one of "
            f"{', '.join(sorted(REGISTRY))} (model signature: {describe(signature)})"
        )
    if len(fits) > 1:
        raise HandlerMismatch(
            f"several handlers match ({', '.join(c.name for c in fits)}); name one in model.json"
        )
    return _make(fits[0], signature, options)


# What Ultralytics' task names mean, for a refusal a user understands.
_TASKS = {
    "segment": "an instance segmentation model",
    "pose": "a pose (keypoint) model",
    "obb": "an oriented-box (OBB) model",
    "classify": "an image classifier",
}


def _task_refusal(task: str) -> str:
    what = _TASKS.get(task, "not a detection model")
    return (f"the model is {what} (task {task!r} in its metadata); only detection and classification models "
            "(task 'detect' or 'classify') are served: export one of those")


def _make(cls: type[Handler], signature: Signature, options: Mapping[str, Any] | HandlerOptions | None) -> Handler:
    try:
        return cls(signature, options)
    except ValidationError as exc:
        raise OptionsRejected(cls.name, cls.options_model, exc) from None
