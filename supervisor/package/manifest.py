"""model.json, the manifest of a model package, as a typed model; and its JSON Schema.

``ManifestFile`` says what a manifest may hold: an unknown key is refused with the nearest valid
one (``min_scor`` -> ``min_score``), a value of the wrong type with the form expected (``"activate":
"false"`` is text, not false). ``handler_options`` are checked against the named family's own model
(handlers/options.py and the family's module). The JSON Schema editors check a manifest against is
generated from the same models: ``python -m supervisor.package.manifest > docs/model.schema.json`` (a test
keeps the published copy current); ``/openapi.json`` carries it too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from handlers.options import HandlerOptions, Score
from supervisor.typed_input import describe_errors, unknown_key

__all__ = ["ManifestFile", "check_handler_options", "manifest_schema", "parse_manifest"]


def _name(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise PydanticCustomError("form", 'text or a whole number, e.g. "2024-06-01" or 3')


def _relative_path(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        pure = PurePosixPath(value.replace("\\", "/"))
        if not pure.is_absolute() and ".." not in pure.parts and ":" not in value:
            return value
    raise PydanticCustomError("form", 'a path inside the package, e.g. "detect.tflite"')


def _sha256(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    raise PydanticCustomError("form", "a SHA-256: 64 hex digits")


NameOrNumber = Annotated[str, PlainValidator(_name), WithJsonSchema({"type": ["string", "integer"], "minLength": 1})]
RelativePath = Annotated[str, PlainValidator(_relative_path), WithJsonSchema({"type": "string", "minLength": 1})]
Sha256 = Annotated[str, PlainValidator(_sha256), WithJsonSchema({"type": "string", "pattern": "^[0-9a-fA-F]{64}$"})]


class ManifestFile(BaseModel):
    """model.json: what a model package declares. Every key is optional; what is left out is inferred
    (the name from the package's file name, the version from its SHA-256, the handler from the model's
    signature, the model and labels files from their names)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True, title="model.json"
    )

    schema_: StrictStr | None = Field(None, alias="$schema")
    """The JSON Schema this file follows, for editors (e.g. docs/model.schema.json); not used by the device."""
    name: NameOrNumber | None = None
    """Model name: the folder models/<name>/ on the device, and what /detect answers with."""
    version: NameOrNumber | None = None
    """Version: the folder models/<name>/<version>/. Default: the start of the package's SHA-256."""
    handler: StrictStr | None = None
    """Model family that pre- and post-processes for the model. Default: the one matching its signature."""
    model: RelativePath | None = None
    """The model file (.onnx or .tflite). Default: the package's only one."""
    labels: RelativePath | None = None
    """The labels file, one class name per line. Default: labels.txt, labelmap.txt, coco_classes.txt or *.names."""
    score_threshold: Score | None = None
    """Detections scoring below this are not returned unless a request asks for a threshold (0..1)."""
    activate: StrictBool = True
    """false: install the package but keep the active model serving."""
    description: StrictStr = ""
    """Free text for people."""
    files: dict[str, Sha256] = Field(default_factory=dict)
    """Path inside the package -> SHA-256 (hex) of the file: each is checked before the model loads."""
    handler_options: dict[str, Any] = Field(default_factory=dict)
    """Tuning of the handler; what is allowed depends on the handler (see its options)."""


_LABEL = {"schema_": "'$schema'"}


def parse_manifest(raw: Any) -> ManifestFile:
    """model.json's parsed JSON -> ManifestFile, its handler_options checked when a handler is named.
    Raises ValueError with one line naming what to fix."""
    if not isinstance(raw, Mapping):
        raise ValueError("model.json must hold a JSON object")
    try:
        manifest = ManifestFile.model_validate(raw)
    except ValidationError as exc:
        names = [f.alias or n for n, f in ManifestFile.model_fields.items()]
        raise ValueError("model.json: " + describe_errors(
            exc, known=names, label=lambda n: _LABEL.get(n, repr(n)),
            forms={"files": "an object mapping each file's path to its SHA-256 (64 hex digits)"},
            # A path that leaves the package is named by its key only (issue 9): echoing it would
            # turn rejection reasons into an oracle for files outside.
            secrets=("model", "labels", "files"),
        )) from None
    if manifest.handler is not None:
        check_handler_options(manifest.handler, manifest.handler_options)
    return manifest


def _registry() -> Mapping[str, Any]:
    """Every name model.json may give a family (its former names too) -> the family."""
    import handlers  # noqa: F401  (importing the package registers every family)
    from handlers.base import ALIASES, REGISTRY

    return {**REGISTRY, **ALIASES}


def check_handler_options(handler: str, options: Mapping[str, Any]) -> HandlerOptions:
    """The options, typed by the family ``handler``. ValueError (one line) for an unknown handler or
    an option the family does not take."""
    registry = _registry()
    family = registry.get(handler)
    if family is None:
        raise ValueError(f"model.json: {unknown_key(handler, registry, 'handler')}")
    return handler_options_of(family.options_model, handler, options)


def handler_options_of(model: type[HandlerOptions], handler: str, options: Mapping[str, Any]) -> HandlerOptions:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ValueError("model.json: " + options_error(exc, model, handler)) from None


def options_error(exc: ValidationError, model: type[HandlerOptions], handler: str) -> str:
    """One line for handler_options that ``model`` (family ``handler``'s options) refused."""
    return describe_errors(exc, known=list(model.model_fields), label=lambda n: f"handler_options.{n}",
                           forms=model.forms, where=f" in handler_options (handler {handler})")


def manifest_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON Schema of model.json (draft 2020-12). ``handler`` lists the families, and a named
    handler's ``handler_options`` must fit that family's options."""
    schema = ManifestFile.model_json_schema(by_alias=True, ref_template=ref_template)
    defs: dict[str, Any] = schema.pop("$defs", {})
    families = sorted(_registry().items())
    option_models: dict[str, type[HandlerOptions]] = {}
    for _, family in families:
        option_models[family.options_model.__name__] = family.options_model
    for model_name, model in option_models.items():
        defs[model_name] = model.model_json_schema(ref_template=ref_template)

    def ref(model: type[HandlerOptions]) -> dict[str, str]:
        return {"$ref": ref_template.format(model=model.__name__)}

    properties = schema["properties"]
    properties["handler"] = {
        "enum": [name for name, _ in families],
        "description": properties["handler"].get("description", ""),
    }
    properties["handler_options"] = {
        "description": properties["handler_options"].get("description", ""),
        "anyOf": [ref(m) for m in option_models.values()],
    }
    schema["allOf"] = [
        {"if": {"properties": {"handler": {"const": name}}, "required": ["handler"]},
         "then": {"properties": {"handler_options": ref(family.options_model)}}}
        for name, family in families
    ]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "$defs": defs}


def main() -> int:
    print(json.dumps(manifest_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
