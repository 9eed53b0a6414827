"""The desired properties of a model update, as the device reads them (``DesiredModel.parse``),
with a reportable reason for what is malformed. ``edgeloader twin-patch`` (cli/twinpatch.py)
writes them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from supervisor.formats import INTENT_SUFFIX, parse_md5, parse_sha256
from supervisor.typed_input import describe_errors

__all__ = ["DesiredModel", "DesiredProperties"]


def _file_name(value: Any) -> str:
    if (
        isinstance(value, str) and value and "/" not in value and "\\" not in value and not value.startswith(".")
        and len(value) <= 200 and not value.endswith((".part", INTENT_SUFFIX)) and value.isprintable()
    ):
        return value
    raise PydanticCustomError("form", "a plain file name (no / or \\, not starting with '.'), e.g. ssd-2.zip")


def _url(value: Any) -> str:
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname:
            return value
    raise PydanticCustomError("form", "an http(s) URL")


def _length(value: Any) -> int:
    # Digits as text are taken too: `az iot hub module-twin update --desired` users quote numbers.
    if not isinstance(value, bool) and re.fullmatch(r"\d+", str(value)) and int(value) > 0:
        return int(value)
    raise PydanticCustomError("form", "a positive whole number of bytes")


def _digest(parse: Any, form: str) -> Any:
    def check(value: Any) -> Any:
        try:
            return parse(str(value))
        except ValueError:
            raise PydanticCustomError("form", form) from None
    return check


def _text(value: Any) -> str:
    if isinstance(value, int | str) and not isinstance(value, bool) and str(value):
        return str(value)
    raise PydanticCustomError("form", "text or a whole number")


class DesiredProperties(BaseModel):
    """The module twin's desired properties for a model update (docs/twin.md). Unknown properties are
    refused, naming the nearest known one: a misspelt ``DownloadURL`` would otherwise read as no request."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    FileName: Annotated[str, PlainValidator(_file_name)] | None = None
    """The package's file name on the device."""
    DownloadUrl: Annotated[str, PlainValidator(_url)] | None = None
    """Where to download it (usually a blob SAS URL)."""
    ContentSHA256: Annotated[str, PlainValidator(_digest(parse_sha256, "64 hex digits"))] | None = None
    """SHA-256 of the package (hex)."""
    ContentMD5: Annotated[bytes, PlainValidator(_digest(parse_md5, "base64 (as Azure Blob gives it) or 32 hex "
                                                                     "digits"))] | None = None
    """MD5 of the package, base64 as Azure Blob Storage shows it, or hex."""
    ContentLength: Annotated[int, PlainValidator(_length)] | None = None
    """Size in bytes."""
    ModelName: Annotated[str, PlainValidator(_text)] | None = None
    """Name to install under when the package's manifest names none."""
    ModelVersion: Annotated[str, PlainValidator(_text)] | None = None
    """Version to install under when the package's manifest names none."""
    Activate: bool = True
    """false: install only; the current model keeps serving."""


@dataclass(frozen=True)
class DesiredModel:
    """The model package the desired properties ask for."""

    file_name: str
    url: str
    sha256: str | None
    md5: bytes | None
    length: int | None
    name: str | None
    version: str | None
    activate: bool
    desired_version: int | None

    @classmethod
    def parse(cls, desired: Mapping[str, Any]) -> DesiredModel | None:
        """None when no model is asked for; ValueError with a reportable reason (one line, never the
        URL) when malformed. Keys starting with '$' ($version, $metadata) belong to IoT Hub."""
        # Empty values are how a deployment says "none" (deployment.template.json): absent.
        ours = {k: v for k, v in desired.items() if not str(k).startswith("$") and v not in (None, "")}
        fields = DesiredProperties.model_fields
        if "FileName" not in ours and "DownloadUrl" not in ours:
            # No model asked for: the rest is not looked at, but a misspelt property still is.
            ours = {k: v for k, v in ours.items() if k not in fields}
        try:
            props = DesiredProperties.model_validate(ours)
        except ValidationError as exc:
            raise ValueError(describe_errors(exc, known=list(fields), label=str, secrets=("DownloadUrl",),
                                             what="desired property")) from None
        if not props.FileName and not props.DownloadUrl:
            return None
        if not props.FileName:
            raise ValueError("FileName is missing")
        if not props.DownloadUrl:
            raise ValueError("DownloadUrl is missing")
        if not props.ContentSHA256 and not props.ContentMD5:
            raise ValueError("ContentSHA256 or ContentMD5 is required")
        version = desired.get("$version")
        return cls(
            file_name=props.FileName,
            url=props.DownloadUrl,
            sha256=props.ContentSHA256,
            md5=props.ContentMD5,
            length=props.ContentLength,
            name=props.ModelName,
            version=props.ModelVersion,
            activate=props.Activate,
            desired_version=version if isinstance(version, int) else None,
        )

    def same_target(self, other: DesiredModel) -> bool:
        """The same request, whatever ``$version`` carries it."""
        return replace(self, desired_version=None) == replace(other, desired_version=None)


